r"""Export a trained cascade for serving (jax.export StableHLO per segment + manifest.json).

    python export.py --workdir runs/cifar --data-dir ../shared/datasets/cifar10-jpeg \
        --rule expert --max-drop 0.01

The operating point: --threshold if given; else, with --data-dir, a threshold calibrated on
the workdir's calibration split (largest FLOPs saving with accuracy at most --max-drop, a
fraction, below the last exit alone), stored in the workdir as `api.calibrate` does; else the
point already stored there by `api.calibrate` or an earlier export.
Serve it with `cnneb_jax.serving` (jax and numpy only).

    python export.py --workdir runs/cifar --release pretrained/cifar \
        --data-dir ../shared/datasets/cifar10-jpeg --train-command "python train.py ..."

`--release` instead writes a small release folder (eval parameters and BatchNorm statistics
of both stages, no optimizer state; see cnneb_jax/release.py) that `api.load`, evaluate.py
and export.py accept as a workdir. It records O1/O2 accuracy on the first 50 test images of
every class of the image folder given by --data-dir, so a copy can be checked quickly.
"""

from __future__ import annotations

import argparse
import sys

from cnneb_jax import host_memory
from cnneb_jax.cli import common


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a trained workdir (both stages)")
    p.add_argument("--out", default=None, help="output folder (default: WORKDIR/export)")
    p.add_argument("--rule", default=None,
                   choices=["expert", "aux5b", "max_softmax", "entropy"],
                   help="exit rule the server uses by default (default: the stored point's "
                        "rule, else expert)")
    p.add_argument("--max-drop", type=float, default=0.01,
                   help="calibration target: accuracy drop vs the last exit alone, a fraction "
                        "in [0, 1) as in api.calibrate (default 0.01 = one point)")
    p.add_argument("--threshold", type=float, default=None,
                   help="use this threshold instead of calibrating (no data needed)")
    common.add_data_flags(p)
    p.add_argument("--max-batch", type=int, default=256, help="largest bucket size")
    p.add_argument("--platforms", default="cpu,cuda",
                   help="comma-separated platforms every part is lowered for (default "
                        "cpu,cuda: an export made on a CPU also runs on an NVIDIA GPU)")
    p.add_argument("--release", default=None, metavar="OUT",
                   help="write a release folder to OUT instead of a serving export "
                        "(needs --data-dir: an image folder with test/<class>/)")
    p.add_argument("--train-command", default="",
                   help="with --release: the command that trained the workdir, recorded")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    host_memory.keep_freed_memory()  # first: before NumPy or JAX start threads
    args = parse_args(argv)
    from pathlib import Path

    from cnneb_jax import api
    from cnneb_jax.checkpoints import CheckpointError
    from cnneb_jax.export import export_cascade
    from cnneb_jax.release import is_release
    from cnneb_jax.workdir import TrainingError

    try:
        if args.release:
            from cnneb_jax.workdir import save_release
            if not args.data_dir or not (Path(args.data_dir) / "test").is_dir():
                raise ValueError("--release needs --data-dir with a test/<class>/ folder")
            meta = save_release(args.workdir, args.release, args.train_command,
                                Path(args.data_dir) / "test")
            print(f"[export] wrote release {args.release}: reference accuracy "
                  f"{meta['reference']['accuracy']} on {meta['reference']['images']} "
                  "test images")
            return 0
        if not 0.0 <= args.max_drop < 1.0:
            raise ValueError(f"--max-drop is a fraction in [0, 1) (0.01 = one point); "
                             f"got {args.max_drop}")
        if args.max_batch < 1:
            raise ValueError(f"--max-batch must be at least 1; got {args.max_batch}")
        cascade = api.load(args.workdir, max_batch=args.max_batch, warm=False)
        stored = cascade.operating_point
        rule = args.rule or stored.get("rule", "expert")
        point = None
        if args.threshold is not None:
            threshold = args.threshold
            if not 0.0 <= threshold <= 1.0:
                raise ValueError(f"--threshold must lie in [0, 1]; got {threshold}")
        elif args.data_dir is None and stored.get("rule") == rule:
            point, threshold = stored, stored["threshold"]
            print(f"[export] {rule}: threshold {threshold:.4f}, stored in {args.workdir}")
        else:
            data = common.workdir_data(args, "calibrating")
            point = api.calibrate(cascade, data["calib_images"], data["calib_labels"],
                                  rule, max_drop=args.max_drop)
            threshold = point["threshold"]
            print(f"[export] {rule}: threshold {threshold:.4f} (calibration accuracy "
                  f"{point['accuracy']:.4f} vs {point['reference_accuracy']:.4f}), stored in "
                  f"{api.operating_point_path(Path(args.workdir))}")
        if args.out is None and is_release(args.workdir):
            raise ValueError(f"{args.workdir} is a release, which stays as shipped: give "
                             "--out for the export")
        out = export_cascade(cascade, args.out or Path(args.workdir) / "export", rule,
                             threshold, point,
                             platforms=[p.strip() for p in args.platforms.split(",") if p.strip()])
        print(f"[export] wrote {out}/manifest.json and {len(list(out.glob('*.stablehlo')))} "
              "StableHLO parts")
    except (ValueError, CheckpointError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
