"""Routing overhead of the batch-mode controller, queued (today) against per chunk (before).

    python experiments/routing_overhead.py --workdir pretrained/cifar \
        --data-dir ../shared/datasets/cifar10-jpeg --deep 0.2,0.3,0.45

For each rule and each share of images sent deep (a threshold at that quantile of the
rule's score on the calibration split), times on the first `--images` test images, in
interleaved rounds: the two pure paths (every image leaves at O1 / none does), the
controller as it routes today (the deep rows of all chunks queue into full buckets), and
the controller called chunk by chunk (each chunk's deep rows padded to their own bucket,
as before the queue). Routing overhead = measured time over the time the exit shares
predict from the two pure paths, minus 1 (issue 11, item 6: target <= 5%). Prints the
median over rounds and its range, and the deep rows executed per useful deep row.
Needs the machine to itself.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnneb_jax import api, checkpoints, data as data_lib  # noqa: E402
from cnneb_jax.controller import all_outputs, run_cascade  # noqa: E402
from cnneb_jax.pipeline import materialize  # noqa: E402
from cnneb_jax.timing import paired_batch  # noqa: E402
from cnneb_jax.sweep import branch_scores  # noqa: E402


def per_chunk(c, x, rule, t) -> dict:
    """The controller without the cross-chunk queue: one call per chunk."""
    parts = [run_cascade(c, x[s:s + c.max_batch], rule, t) for s in range(0, len(x), c.max_batch)]
    return {"exit": np.concatenate([p["exit"] for p in parts]),
            "rows_run": np.sum([p["rows_run"] for p in parts], axis=0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="pretrained/cifar")
    p.add_argument("--data-dir", default="../shared/datasets/cifar10-jpeg")
    p.add_argument("--rules", default="max_softmax,entropy,expert")
    p.add_argument("--deep", default="0.2,0.3,0.45",
                   help="shares of images sent deep (quantiles of the calibration scores)")
    p.add_argument("--images", type=int, default=2000, help="test images timed")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args()
    cfg = checkpoints.load_config(Path(args.workdir))
    d = data_lib.load_dataset(cfg, args.data_dir)
    c = api.load(args.workdir)
    x_cal = np.asarray(materialize(d["calib_images"]))
    x = np.asarray(materialize(d["test_images"]))[:args.images]
    out_cal = all_outputs(c, x_cal)
    rows = []
    for rule in args.rules.split(","):
        scores = branch_scores(out_cal, rule)[0]
        for share in (float(s) for s in args.deep.split(",")):
            t = float(np.quantile(scores, share))   # scores <= t go deep
            queued, chunked = run_cascade(c, x, rule, t), per_chunk(c, x, rule, t)
            assert (queued["exit"] == chunked["exit"]).all()
            deep = float((queued["exit"] == 1).mean())
            sec = paired_batch(x, {
                "all_leave": lambda z, r=rule: run_cascade(c, z, r, -1.0),
                "none_leave": lambda z, r=rule: run_cascade(c, z, r, 2.0),
                "queued": lambda z, r=rule, t=t: run_cascade(c, z, r, t),
                "per_chunk": lambda z, r=rule, t=t: per_chunk(c, z, r, t)}, args.rounds)
            pred = (1 - deep) * sec["all_leave"] + deep * sec["none_leave"]
            row = {"rule": rule, "threshold": t, "deep_share": deep,
                   "ms_all_leave": 1e3 * float(np.median(sec["all_leave"])),
                   "ms_none_leave": 1e3 * float(np.median(sec["none_leave"]))}
            for mode, out in (("queued", queued), ("per_chunk", chunked)):
                over = sec[mode] / pred - 1
                row[mode] = {"overhead": float(np.median(over)), "min": float(over.min()),
                             "max": float(over.max()),
                             "ms": 1e3 * float(np.median(sec[mode])),
                             "deep_rows_run_per_useful": float(out["rows_run"][1]
                                                               / max(1, (out["exit"] == 1).sum()))}
            rows.append(row)
            print(f"{rule:12s} deep {deep:5.1%}: overhead queued {row['queued']['overhead']:+.1%} "
                  f"({row['queued']['min']:+.1%} to {row['queued']['max']:+.1%}), per chunk "
                  f"{row['per_chunk']['overhead']:+.1%} ({row['per_chunk']['min']:+.1%} to "
                  f"{row['per_chunk']['max']:+.1%}); deep rows run per useful: queued "
                  f"{row['queued']['deep_rows_run_per_useful']:.3f}, per chunk "
                  f"{row['per_chunk']['deep_rows_run_per_useful']:.3f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"images": len(x), "rounds": args.rounds,
                                              "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
