"""Serving figures at the calibrated operating point, measured in one run:

- images/s of a stream of request batches through the per-batch controller (`api.predict`)
  and the throughput mode (`throughput.serve`), in interleaved rounds, with the share of
  samples whose exit agrees;
- the exported cascade (`serving`) against the live one, for uint8 and float input.

(Session 12's comparison with the session-7 controller, and its byte counts, came from
this script up to commit e885ef4; docs/experiments.md §12 keeps the figures.)

    python bench/serving.py --workdir pretrained/cifar --data-dir ../shared/datasets/cifar10-jpeg
    python bench/serving.py --save-npz split.npz ...   # the splits, to measure on a machine
    python bench/serving.py --data-npz split.npz ...   # without the image folder

The operating point is calibrated on the workdir's calibration split (`api.calibrate`,
largest FLOPs saving within --max-drop of the last exit), never on test.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import benchlib
from cnneb_jax import api, serving, throughput


def compare_export(c, export_dir, x, label: str) -> dict:
    """Exits, labels and probabilities of `serving` against `api.predict` at the export's
    own operating point, for uint8 and float input."""
    served = serving.load(export_dir)
    rule, thr = served.manifest["rule"], served.manifest["threshold"]
    out = {"rule": rule, "threshold": thr, "platforms": served.manifest.get("platforms")}
    for kind, imgs in (("uint8", x), ("float", x.astype(np.float32) / 255)):
        live = api.predict(c, imgs, rule, thr)
        exp = serving.predict(served, imgs)
        e = out[kind] = {"images": len(imgs),
                         "exit_agree": float((live["exit"] == exp["exit"]).mean()),
                         "label_agree": float((live["labels"] == exp["labels"]).mean()),
                         "max_prob_diff": float(np.abs(live["probs"] - exp["probs"]).max())}
        print(f"export ({label}) vs live, {kind} input, {len(imgs)} images: exits agree "
              f"{e['exit_agree']:.4f}, labels agree {e['label_agree']:.4f}, "
              f"max |prob difference| {e['max_prob_diff']:.2e}")
    return out


# ---- the run ------------------------------------------------------------------------------

def load_splits(args) -> dict:
    if args.data_npz:
        with np.load(args.data_npz) as z:
            return {k: z[k] for k in z.files}
    from cnneb_jax import checkpoints, data as data_lib
    from cnneb_jax.pipeline import materialize
    cfg = checkpoints.load_config(Path(args.workdir))
    d = data_lib.load_dataset(cfg, args.data_dir)
    return {k: np.asarray(materialize(d[k])) for k in
            ("calib_images", "calib_labels", "test_images", "test_labels")}


def stream_seconds(run, requests) -> float:
    t = time.perf_counter()
    run(requests)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> None:
    p = benchlib.parser(__doc__)
    p.add_argument("--workdir", default="pretrained/cifar")
    p.add_argument("--data-dir", default=None, help="the image folder the workdir was trained on")
    p.add_argument("--data-npz", default=None, help="calib/test splits saved by --save-npz")
    p.add_argument("--save-npz", default=None, help="write the calib/test splits here and stop")
    p.add_argument("--rule", default="expert")
    p.add_argument("--max-drop", type=float, default=0.01)
    p.add_argument("--max-batch", type=int, default=256, help="largest bucket")
    p.add_argument("--request-batch", type=int, default=64, help="images per request")
    p.add_argument("--images", type=int, default=4096, help="test images in the stream")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--max-wait", type=float, default=0.05, help="throughput mode's wait bound (s)")
    p.add_argument("--exported", default=None,
                   help="also compare this export folder (made on another machine) with "
                        "the live cascade")
    p.add_argument("--export-to", default=None,
                   help="export the cascade at the calibrated point here and stop")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    splits = load_splits(args)
    if args.save_npz:
        np.savez(args.save_npz, **splits)
        print(f"wrote {args.save_npz}")
        return
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()})")
    t = time.perf_counter()
    c = api.load(args.workdir, max_batch=args.max_batch)
    print(f"api.load: {time.perf_counter() - t:.1f} s")
    point = api.calibrate(c, splits["calib_images"], splits["calib_labels"], rule=args.rule,
                          max_drop=args.max_drop, save=False)
    rule, thr = point["rule"], point["threshold"]
    if args.export_to:
        from cnneb_jax.export import export_cascade
        export_cascade(c, args.export_to, rule, thr, calibration=point)
        print(f"exported to {args.export_to} ({rule}, threshold {thr:.4f})")
        return
    print(f"operating point (calibration split, {len(splits['calib_labels'])} images): {rule} "
          f"threshold {thr:.4f}, calibration accuracy {point['accuracy']:.4f} vs "
          f"{point['reference_accuracy']:.4f}")
    x = splits["test_images"][:args.images]
    y = splits["test_labels"][:args.images]
    requests = [x[s:s + args.request_batch] for s in range(0, len(x), args.request_batch)]
    runs = {
        "per-batch": lambda rq: [api.predict(c, r, rule, thr) for r in rq],
        "throughput mode": lambda rq: list(throughput.serve(c, rq, rule, thr,
                                                            max_wait_s=args.max_wait)),
    }
    # Warm pass, and agreement.
    exits = {}
    for name, run in runs.items():
        outs = run(requests)
        exits[name] = np.concatenate([o["exit"] for o in outs])
    first = next(iter(exits))
    agree = {n: float((e == exits[first]).mean()) for n, e in exits.items()}
    secs = {n: [] for n in runs}
    for r in range(args.rounds):
        for name, run in (runs.items() if r % 2 == 0 else reversed(runs.items())):
            secs[name].append(stream_seconds(run, requests))
    n = len(x)
    ref = np.array(secs[first])
    result = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
              "rule": rule, "threshold": thr, "max_drop": args.max_drop,
              "share_exit1": float((exits["per-batch"] == 0).mean()),
              "test_accuracy": None, "images": n, "request_batch": args.request_batch,
              "max_batch": args.max_batch, "max_wait_s": args.max_wait, "rounds": args.rounds,
              "modes": {}}
    pred = np.concatenate([o["labels"] for o in runs["per-batch"](requests)])
    result["test_accuracy"] = float((pred == y).mean())
    print(f"{n} test images in requests of {args.request_batch}; {result['share_exit1']:.1%} "
          f"leave at O1; accuracy {result['test_accuracy']:.4f}; rounds {args.rounds}")
    print("| mode | images/s (median) | min-max | speed vs per-batch (median, min-max) | "
          "exits agree |")
    print("|---|---:|---:|---:|---:|")
    for name, s in secs.items():
        s = np.array(s)
        ratio = ref / s
        result["modes"][name] = {"images_per_s": float(n / np.median(s)),
                                 "images_per_s_min": float(n / s.max()),
                                 "images_per_s_max": float(n / s.min()),
                                 "speedup": float(np.median(ratio)),
                                 "speedup_min": float(ratio.min()),
                                 "speedup_max": float(ratio.max()), "exits_agree": agree[name]}
        r = result["modes"][name]
        print(f"| {name} | {r['images_per_s']:.0f} | {r['images_per_s_min']:.0f}-"
              f"{r['images_per_s_max']:.0f} | {r['speedup']:.2f} ({r['speedup_min']:.2f}-"
              f"{r['speedup_max']:.2f}) | {agree[name]:.4f} |")

    # The exported cascade against the live one: exported here, and (--exported) one
    # exported on another machine.
    with tempfile.TemporaryDirectory() as d:
        from cnneb_jax.export import export_cascade
        export_cascade(c, d, rule, thr)
        result["export"] = compare_export(c, d, x, "exported here")
        if args.exported:
            result["export_elsewhere"] = compare_export(c, args.exported, x, args.exported)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
