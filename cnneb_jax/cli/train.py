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

from cnneb_jax.configs import CONFIGS, get_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["backbone", "expert", "all"], default="all",
                   help="which training stage to run (default: all = backbone, then expert)")
    p.add_argument("--config", default="cifar", choices=sorted(CONFIGS),
                   help="named config (default: cifar, 32x32 CIFAR-10 Inception v3 at width 0.25)")
    p.add_argument("--workdir", required=True,
                   help="folder for checkpoints, config.json, metrics.jsonl and results")
    p.add_argument("--data-dir", default=None,
                   help="image folder with train/<class>/* and test/<class>/* (read with "
                        "tfds ImageFolder); if omitted, tfds.load(config.dataset) downloads it")
    p.add_argument("--val-dir", default=None,
                   help="folder of <class>/<image> held out for expert labels and calibration "
                        "(the last calib_size of them), instead of val_size images drawn from "
                        "train/; all of train/ then trains the backbone. Or hold out whole "
                        "groups of near-identical images: --set group_pattern=REGEX")
    p.add_argument("--cache-dir", default=None,
                   help="where decoded images are cached (default: ~/.cache/cnneb_jax "
                        "or $CNNEB_CACHE)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field, e.g. --set epochs=2 --set width=0.5 "
                        "(repeatable; see cnneb_jax/configs.py for the fields)")
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
    args = parse_args(argv)
    overrides = {}
    for item in args.set:
        if "=" not in item:
            print(f"error: --set expects FIELD=VALUE, got {item!r}", file=sys.stderr)
            return 2
        key, value = item.split("=", 1)
        overrides[key.strip()] = value.strip()
    if args.backbone_from is not None and args.stage != "expert":
        print("error: --backbone-from goes with --stage expert", file=sys.stderr)
        return 2
    if args.init_from is not None and args.stage == "expert":
        print("error: --init-from goes with --stage backbone or all", file=sys.stderr)
        return 2
    # Imports after parsing so that --help is instant.
    from pathlib import Path

    from cnneb_jax import data as data_lib
    from cnneb_jax import distributed
    from cnneb_jax.checkpoints import CheckpointError
    from cnneb_jax.pipeline import FileSplit
    from cnneb_jax.stages import (TrainingError, TrainingInterrupted, train_backbone,
                                  train_expert)

    if args.cpu_devices is not None:
        try:
            distributed.split_cpu(args.cpu_devices)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    distributed.initialize()  # multi-host when a launcher set it up; else nothing

    try:
        cfg = get_config(args.config, overrides)
        cache = Path(args.cache_dir) if args.cache_dir else data_lib.DEFAULT_CACHE
        data = data_lib.load_dataset(cfg, args.data_dir, cache, args.val_dir)
        cfg = data_lib.with_classes(cfg, data["class_names"])
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
