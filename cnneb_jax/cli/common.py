"""What the programs share: the data flags, reading the data a workdir was trained on
(checked against its lineage), and --set overrides."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_data_flags(p: argparse.ArgumentParser, training: bool = False) -> None:
    """--data-dir, --val-dir and --cache-dir, worded for training or for a trained workdir."""
    p.add_argument("--data-dir", default=None,
                   help="image folder with train/<class>/* and test/<class>/* (read with "
                        "tfds ImageFolder), or a tfds data dir; if omitted, "
                        "tfds.load(config.dataset) downloads it")
    if training:
        p.add_argument("--val-dir", default=None,
                       help="folder of <class>/<image> held out for expert labels and "
                            "calibration (the last calib_size of them), instead of val_size "
                            "images drawn from train/; all of train/ then trains the "
                            "backbone. Or hold out whole groups of near-identical images: "
                            "--set group_pattern=REGEX")
    else:
        p.add_argument("--val-dir", default=None,
                       help="the --val-dir the workdir was trained with, if any (its last "
                            "calib_size images are the calibration split)")
    p.add_argument("--cache-dir", default=None,
                   help="where decoded images are cached (default: ~/.cache/cnneb_jax "
                        "or $CNNEB_CACHE)")


def add_config_flags(p: argparse.ArgumentParser, default: str = "cifar") -> None:
    """--config (a named config) and --set FIELD=VALUE overrides."""
    from cnneb_jax.configs import CONFIGS
    p.add_argument("--config", default=default, choices=sorted(CONFIGS),
                   help=f"named config (default: {default}; see cnneb_jax/configs.py)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field, e.g. --set epochs=2 --set width=0.5 "
                        "(repeatable; see cnneb_jax/configs.py for the fields)")


def overrides(items: list[str]) -> dict[str, str]:
    """--set's FIELD=VALUE items as a dict; ValueError names a malformed one."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def load_data(cfg, args: argparse.Namespace) -> dict:
    """The splits of --data-dir (or tfds) for `cfg`, through the decode cache."""
    from cnneb_jax import data as data_lib
    from cnneb_jax.cache import cache_root
    cache = Path(args.cache_dir) if args.cache_dir else cache_root()
    return data_lib.load_dataset(cfg, args.data_dir, cache, args.val_dir)


def workdir_data(args: argparse.Namespace, doing: str, max_test: int = 0) -> dict:
    """The data of a trained --workdir, refused unless it is what its backbone trained on
    (`doing` names the task in the message); the calibration and test splits in memory
    (the cascade routes arrays), the first `max_test` test images only if > 0."""
    from cnneb_jax.checkpoints import load_config
    from cnneb_jax.pipeline import materialize
    from cnneb_jax.workdir import check_data_lineage
    cfg = load_config(Path(args.workdir))
    if max_test:
        cfg = cfg.replace(max_test_examples=max_test)
    data = load_data(cfg, args)
    check_data_lineage(args.workdir, data, doing)
    for split in ("test", "calib"):   # decoded here when streamed
        data[f"{split}_images"] = materialize(data[f"{split}_images"])
    return data
