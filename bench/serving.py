"""Serving figures at the calibrated operating point, measured in one run (issue 12):

- images/s of a stream of request batches through (a) the session-7 per-batch controller
  (one program per segment, head and expert, two host reads per branch point, no dispatch
  ahead; kept below as `legacy_run` for this comparison), (b) today's per-batch controller
  (`api.predict`), (c) the throughput mode (`throughput.serve`), in interleaved rounds;
- bytes moved host-to-device and device-to-host per image by (a) and (b);
- the exported cascade (`serving`) against the live one, for uint8 and float input.

    python bench/serving.py --workdir pretrained/cifar --data-dir ../shared/datasets/cifar10-jpeg
    python bench/serving.py --save-npz split.npz ...   # the splits, to measure on a machine
    python bench/serving.py --data-npz split.npz ...   # without the image folder

The operating point is calibrated on the workdir's calibration split (`api.calibrate`,
largest FLOPs saving within --max-drop of the last exit), never on test.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from cnneb_jax import api, controller, serving, throughput  # noqa: E402
from cnneb_jax.data import normalize  # noqa: E402


# ---- the session-7 per-batch controller, for the before/after comparison ----------------

def legacy_fns(c):
    return {**c.fns, "normalize": jax.jit(normalize),
            "take": jax.jit(lambda h, idx: jnp.take(h, idx, axis=0))}


def legacy_run(c, fns, images, rule, threshold, counter=None):
    """Session 7's run_cascade: segment, exit and expert as separate programs; the exit's
    and the expert's logits read separately; chunks one after another."""
    if len(images) > c.max_batch:
        parts = [legacy_run(c, fns, images[s:s + c.max_batch], rule, threshold, counter)
                 for s in range(0, len(images), c.max_batch)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    model, v = c.model, c.variables
    m, n = model.num_exits, len(images)
    segs, heads = list(model.segments), list(model.heads)
    count = counter or (lambda *a: None)
    out_logits = np.zeros((n, model.cfg.num_classes), np.float32)
    out_exit = np.full(n, m - 1, np.int32)
    active = np.arange(n)
    x = controller.pad_rows(controller.pixels(images), controller.bucket_for(c, n))
    count("h2d", x)
    h = fns["normalize"](x)
    for i in range(m):
        h = fns[f"seg:{segs[i]}"](v["segments"][segs[i]], h)
        o = fns[f"head:{heads[i]}"](v["heads"][heads[i]], h)
        if i == m - 1:
            o_np = np.asarray(o)
            count("d2h", o_np)
            out_logits[active] = o_np[:len(active)]
            break
        name = f"E{i + 1}"
        e = None
        if rule == "expert":
            e = np.asarray(fns[f"expert:{name}"](v["experts"][name], h, o))
        elif rule == "aux5b":
            e = np.asarray(fns[f"aux5b:{name}"](v["aux5b"][name], h))
        o_np = np.asarray(o)
        count("d2h", o_np)
        if e is not None:
            count("d2h", e)
            e = e[:len(active)]
        o_np = o_np[:len(active)]
        leave = controller.rule_score(rule, o_np, e) > threshold
        out_logits[active[leave]] = o_np[leave]
        out_exit[active[leave]] = i
        keep = np.nonzero(~leave)[0]
        if len(keep) == 0:
            break
        active = active[keep]
        idx = controller.pad_rows(keep.astype(np.int32), controller.bucket_for(c, len(keep)))
        count("h2d", idx)
        h = fns["take"](h, idx)
    return {"logits": out_logits, "exit": out_exit}


# ---- byte counts of today's controller ---------------------------------------------------

class Bytes:
    def __init__(self):
        self.h2d = self.d2h = 0

    def __call__(self, kind, a):
        setattr(self, kind, getattr(self, kind) + a.nbytes)


def count_new(c, images, rule, threshold) -> Bytes:
    """Bytes of numpy arrays handed to compiled programs (host to device) and of the arrays
    the host reads back, for one api.predict call."""
    b = Bytes()
    real_program, real_asarray = controller._program, np.asarray

    def program(c_, key, x):
        prog = real_program(c_, key, x)

        def run(*args):
            for a in jax.tree_util.tree_leaves(args):
                if isinstance(a, np.ndarray):
                    b("h2d", a)
            return prog(*args)
        return run

    def asarray(a, *args, **kw):
        out = real_asarray(a, *args, **kw)
        if isinstance(a, jax.Array):
            b("d2h", out)
        return out
    controller._program, controller.np.asarray = program, asarray
    try:
        api.predict(c, images, rule, threshold)
    finally:
        controller._program, controller.np.asarray = real_program, real_asarray
    return b


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
    args = p.parse_args()
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
    fns = legacy_fns(c)
    runs = {
        "per-batch, session 7": lambda rq: [legacy_run(c, fns, r, rule, thr) for r in rq],
        "per-batch, fused": lambda rq: [api.predict(c, r, rule, thr) for r in rq],
        "throughput mode": lambda rq: list(throughput.serve(c, rq, rule, thr,
                                                            max_wait_s=args.max_wait)),
    }
    # Warm pass (compiles the legacy functions and the queue programs), and agreement.
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
              "share_exit1": float((exits["per-batch, fused"] == 0).mean()),
              "test_accuracy": None, "images": n, "request_batch": args.request_batch,
              "max_batch": args.max_batch, "max_wait_s": args.max_wait, "rounds": args.rounds,
              "modes": {}}
    pred = np.concatenate([o["labels"] for o in runs["per-batch, fused"](requests)])
    result["test_accuracy"] = float((pred == y).mean())
    print(f"{n} test images in requests of {args.request_batch}; {result['share_exit1']:.1%} "
          f"leave at O1; accuracy {result['test_accuracy']:.4f}; rounds {args.rounds}")
    print(f"| mode | images/s (median) | min-max | ratio to session 7 (median, min-max) | "
          f"exits agree |")
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

    # Bytes per image, one request of --request-batch images each way.
    req = requests[0]
    old = Bytes()
    legacy_run(c, fns, req, rule, thr, old)
    new = count_new(c, req, rule, thr)
    new_f = count_new(c, req.astype(np.float32) / 255, rule, thr)
    result["bytes_per_image"] = {
        "session 7, uint8": {"h2d": old.h2d / len(req), "d2h": old.d2h / len(req)},
        "fused, uint8": {"h2d": new.h2d / len(req), "d2h": new.d2h / len(req)},
        "fused, float": {"h2d": new_f.h2d / len(req), "d2h": new_f.d2h / len(req)}}
    print("bytes per image (host to device / device to host):")
    for k, v in result["bytes_per_image"].items():
        print(f"  {k}: {v['h2d']:.0f} / {v['d2h']:.0f}")

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
