"""Routing and fixed overhead of the batch-mode controller (and, with --per-chunk, the queued
controller of today against the per-chunk one of before).

    python experiments/routing_overhead.py --workdir pretrained/cifar \
        --data-dir ../shared/datasets/cifar10-jpeg --deep 0.2,0.3,0.45
    python experiments/routing_overhead.py --summarize RUN1.json RUN2.json ... OUT.json

For each rule and each share of images sent deep (a threshold at that quantile of the
rule's score on the calibration split), times on the first `--images` test images, in
interleaved rounds in a random order: O2 alone (the plain network, `run_plain`), the two
pure paths (every image leaves at O1 / none does), the controller as it routes today (the
deep rows of all chunks queue into full buckets), and with --per-chunk the controller called
chunk by chunk (each chunk's deep rows padded to their own bucket, as before the queue).
Routing overhead = measured time over the time the exit shares predict from the two pure
paths, minus 1 (issue 11, item 6: target <= 5%). Fixed overhead = the path where none
leaves over O2 alone, minus 1: what the cascade costs when it saves nothing (O1's head, the
rule, the host read; issue 35, item 2). Prints medians over rounds with their range, and
the deep rows executed per useful deep row. Needs the machine to itself; run it several
times for the spread between runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnneb_jax import api, checkpoints, data as data_lib  # noqa: E402
from cnneb_jax.controller import all_outputs, run_cascade, run_plain  # noqa: E402
from cnneb_jax.programs import warm_up  # noqa: E402
from cnneb_jax.pipeline import materialize  # noqa: E402
from cnneb_jax.timing import paired_batch  # noqa: E402
from cnneb_jax.sweep import branch_scores  # noqa: E402


def per_chunk(c, x, rule, t) -> dict:
    """The controller without the cross-chunk queue: one call per chunk."""
    parts = [run_cascade(c, x[s:s + c.max_batch], rule, t) for s in range(0, len(x), c.max_batch)]
    return {"exit": np.concatenate([p["exit"] for p in parts]),
            "rows_run": np.sum([p["rows_run"] for p in parts], axis=0)}


def summarize(files: list[str]) -> dict:
    """Several runs' JSON -> per (rule, deep share): each run's median routing and fixed
    overhead, and the median and range over runs."""
    runs = [json.loads(Path(f).read_text()) for f in files]
    out = {"runs": files, "images": [r["images"] for r in runs],
           "rounds": [r["rounds"] for r in runs], "rows": []}
    for i, row in enumerate(runs[0]["rows"]):
        same = [r["rows"][i] for r in runs]
        assert all(x["rule"] == row["rule"] and x["threshold"] == row["threshold"] for x in same)
        routing = [x["queued"]["overhead"] for x in same]
        fixed = [x["fixed_overhead"] for x in same]
        out["rows"].append({
            "rule": row["rule"], "deep_share": row["deep_share"],
            "routing_per_run": routing, "routing_median": float(np.median(routing)),
            "fixed_per_run": fixed, "fixed_median": float(np.median(fixed))})
    return out


def main() -> None:
    if sys.argv[1:2] == ["--summarize"]:
        # python experiments/routing_overhead.py --summarize RUN.json ... OUT.json
        *files, target = sys.argv[2:]
        summary = summarize(files)
        Path(target).write_text(json.dumps(summary, indent=1))
        for r in summary["rows"]:
            print(f"{r['rule']:12s} deep {r['deep_share']:5.1%}: routing "
                  f"{' '.join(f'{v:+.1%}' for v in r['routing_per_run'])} (median "
                  f"{r['routing_median']:+.1%}); fixed "
                  f"{' '.join(f'{v:+.1%}' for v in r['fixed_per_run'])} (median "
                  f"{r['fixed_median']:+.1%})")
        return
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="pretrained/cifar")
    p.add_argument("--data-dir", default="../shared/datasets/cifar10-jpeg")
    p.add_argument("--rules", default="max_softmax,entropy,expert")
    p.add_argument("--deep", default="0.2,0.3,0.45",
                   help="shares of images sent deep (quantiles of the calibration scores)")
    p.add_argument("--images", type=int, default=2000, help="test images timed")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    p.add_argument("--per-chunk", action="store_true",
                   help="also time the per-chunk controller of before the queue")
    p.add_argument("--seed", type=int, default=0, help="seed of the round orders")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args()
    cfg = checkpoints.load_config(Path(args.workdir))
    d = data_lib.load_dataset(cfg, args.data_dir)
    c = api.load(args.workdir)
    warm_up(c, reference=True)
    m = c.model.num_exits
    x_cal = np.asarray(materialize(d["calib_images"]))
    x = np.asarray(materialize(d["test_images"]))[:args.images]
    out_cal = all_outputs(c, x_cal)
    rows = []
    for rule in args.rules.split(","):
        scores = branch_scores(out_cal, rule)[0]
        for share in (float(s) for s in args.deep.split(",")):
            t = float(np.quantile(scores, share))   # scores <= t go deep
            queued = run_cascade(c, x, rule, t)
            runs = {"ref": lambda z: run_plain(c, z, m - 1),
                    "all_leave": lambda z, r=rule: run_cascade(c, z, r, -1.0),
                    "none_leave": lambda z, r=rule: run_cascade(c, z, r, 2.0),
                    "queued": lambda z, r=rule, t=t: run_cascade(c, z, r, t)}
            modes = [("queued", queued)]
            if args.per_chunk:
                chunked = per_chunk(c, x, rule, t)
                assert (queued["exit"] == chunked["exit"]).all()
                runs["per_chunk"] = lambda z, r=rule, t=t: per_chunk(c, z, r, t)
                modes.append(("per_chunk", chunked))
            deep = float((queued["exit"] == 1).mean())
            sec = paired_batch(x, runs, args.rounds, seed=args.seed)
            pred = (1 - deep) * sec["all_leave"] + deep * sec["none_leave"]
            fixed = sec["none_leave"] / sec["ref"] - 1
            row = {"rule": rule, "threshold": t, "deep_share": deep,
                   "ms_ref": 1e3 * float(np.median(sec["ref"])),
                   "ms_all_leave": 1e3 * float(np.median(sec["all_leave"])),
                   "ms_none_leave": 1e3 * float(np.median(sec["none_leave"])),
                   "fixed_overhead": float(np.median(fixed)), "fixed_min": float(fixed.min()),
                   "fixed_max": float(fixed.max())}
            for mode, out in modes:
                over = sec[mode] / pred - 1
                row[mode] = {"overhead": float(np.median(over)), "min": float(over.min()),
                             "max": float(over.max()),
                             "ms": 1e3 * float(np.median(sec[mode])),
                             "deep_rows_run_per_useful": float(out["rows_run"][1]
                                                               / max(1, (out["exit"] == 1).sum()))}
            rows.append(row)
            print(f"{rule:12s} deep {deep:5.1%}: routing overhead "
                  + ", ".join(f"{mode} {row[mode]['overhead']:+.1%} ({row[mode]['min']:+.1%} to "
                              f"{row[mode]['max']:+.1%}, deep rows run per useful "
                              f"{row[mode]['deep_rows_run_per_useful']:.3f})"
                              for mode, _ in modes)
                  + f"; fixed overhead {row['fixed_overhead']:+.1%} ({row['fixed_min']:+.1%} to "
                  f"{row['fixed_max']:+.1%})", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"images": len(x), "rounds": args.rounds,
                                              "seed": args.seed, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
