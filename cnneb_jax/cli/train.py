r"""Train a CNN with expert branches, stage by stage.

    python train.py --stage all --config cifar --workdir runs/cifar \
        --data-dir ../shared/datasets/cifar10-jpeg

Stages: `backbone` (stem, trunk, O1 and O2 jointly), `expert` (backbone frozen; the proposed
expert E1 and the Auxiliary+5b expert learn FT vs Other on held-out images), `all` (both).
Rerun with the same --workdir to resume from the latest checkpoint; a finished stage is
skipped unless --retrain is given.
"""

from __future__ import annotations

import argparse
import sys

from cnneb_jax import host_memory
from cnneb_jax.cli import common
from cnneb_jax.configs import get_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["backbone", "expert", "all"], default="all",
                   help="which training stage to run (default: all = backbone, then expert)")
    p.add_argument("--workdir", required=True,
                   help="folder for checkpoints, config.json, metrics.jsonl and results")
    common.add_config_flags(p)
    common.add_data_flags(p, training=True)
    p.add_argument("--cpu-devices", type=int, default=None, metavar="N",
                   help="present the CPU as N JAX devices and train data-parallel across "
                        "them (default: leave XLA_FLAGS as it is, i.e. one CPU device). "
                        "Isolated steps ran 1.2x faster on 2 devices on a 2-core host, a "
                        "real run did not (docs/RESULTS.md); GPUs are not affected. "
                        "batch_size must be a multiple of the device count")
    p.add_argument("--backbone-from", default=None, metavar="DIR",
                   help="with --stage expert and a new --workdir: train the experts on the "
                        "frozen backbone of DIR (a trained workdir or a release such as "
                        "pretrained/cifar) instead of this workdir's own, e.g. "
                        "--config cifar_confidence for the E1 ablation; the configs may "
                        "differ only in the expert stage's fields. evaluate.py --ablation "
                        "then sweeps the two side by side")
    p.add_argument("--init-from", default=None, metavar="FILE",
                   help="start the backbone stage from a Keras Inception v3 (.keras or .h5, "
                        "e.g. keras.applications.InceptionV3(weights='imagenet').save(...)) "
                        "instead of random weights; needs an Inception v3 config with "
                        "input_norm=inception, such as imagenette_transfer. By default "
                        "(finetune=heads) the imported trunk stays frozen and only the new "
                        "heads train: O1, and O2 when the class count differs; --set "
                        "finetune=all fine-tunes everything")
    p.add_argument("--retrain", action="store_true",
                   help="train the chosen stage(s) again even if already finished")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    host_memory.keep_freed_memory()  # first: before NumPy or JAX start threads
    args = parse_args(argv)
    try:
        overrides = common.overrides(args.set)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.backbone_from is not None and args.stage != "expert":
        print("error: --backbone-from goes with --stage expert", file=sys.stderr)
        return 2
    if args.init_from is not None and args.stage == "expert":
        print("error: --init-from goes with --stage backbone or all", file=sys.stderr)
        return 2
    # Imports after parsing so that --help is instant.
    from cnneb_jax import splits
    from cnneb_jax import distributed
    from cnneb_jax.checkpoints import CheckpointError
    from cnneb_jax.pipeline import FileSplit
    from cnneb_jax.workdir import TrainingError
    from cnneb_jax.loop import TrainingInterrupted
    from cnneb_jax.backbone_stage import train_backbone
    from cnneb_jax.expert_stage import train_expert

    if args.cpu_devices is not None:
        try:
            distributed.split_cpu(args.cpu_devices)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    distributed.initialize()  # multi-host when a launcher set it up; else nothing

    try:
        cfg = get_config(args.config, overrides)
        data = common.load_data(cfg, args)
        cfg = splits.with_classes(cfg, data["class_names"])
        streamed = isinstance(data["train_images"], FileSplit)
        print(f"[data] train {len(data['train_images'])}, held-out val "
              f"{len(data['val_images'])} + calib {len(data['calib_images'])}, "
              f"test {len(data['test_images'])}; {cfg.num_classes} classes; "
              + ("streamed from the files" if streamed else "decoded in memory"))
        if args.stage in ("backbone", "all"):
            train_backbone(cfg, data, args.workdir, retrain=args.retrain,
                           init_from=args.init_from)
        if args.stage in ("expert", "all"):
            train_expert(cfg, data, args.workdir, retrain=args.retrain,
                         backbone_from=args.backbone_from)
    except (ValueError, CheckpointError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        print(e, file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"[train] interrupted before a training loop began; run the same command "
              f"again to start (finished stages in {args.workdir} are kept)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
