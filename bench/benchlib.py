"""What the benchmarks share: the repository on sys.path (a benchmark runs as
`python bench/NAME.py` from a checkout), a parser whose --help is the module docstring, a
config by name with --set overrides, random variables of a model's shapes, and how a timing
spread is printed. Timing itself is cnneb_jax/timing.py's (medians after a warm pass,
interleaved rounds). Nothing of cnneb_jax is imported until a function needs it, so a
benchmark may first put another checkout's on the path (decode_cache.py --tree)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))



def parser(doc: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def config_flags(p: argparse.ArgumentParser, default: str = "cifar") -> None:
    """--config NAME and --set FIELD=VALUE, as train.py takes them."""
    from cnneb_jax.cli.common import add_config_flags
    add_config_flags(p, default)


def overrides(sets: list[str]) -> dict[str, str]:
    from cnneb_jax.cli.common import overrides as parse
    return parse(sets)


def config(name: str, sets: list[str] | dict | None = None):
    """A named config with --set overrides (a list of FIELD=VALUE, or a dict); 10 classes
    where the config takes its count from the data."""
    from cnneb_jax.configs import get_config
    cfg = get_config(name, sets if isinstance(sets, dict) else overrides(sets or []))
    return cfg.replace(num_classes=cfg.num_classes or 10)


def random_variables(model):
    """Variables of the model's shapes without the slow eager init: He-normal kernels, zero
    biases and BatchNorm means, unit BatchNorm variances (activations keep their scale,
    nothing overflows or goes denormal, which could change a kernel's speed)."""
    import jax
    from cnneb_jax.model import abstract_variables
    rng = np.random.default_rng(0)

    def leaf(path, a):
        name = getattr(path[-1], "key", "")
        if name == "var":
            return np.ones(a.shape, a.dtype)
        if name == "kernel":
            fan_in = int(np.prod(a.shape[:-1]))
            return (rng.standard_normal(a.shape) * np.sqrt(2 / fan_in)).astype(a.dtype)
        return np.zeros(a.shape, a.dtype)
    return jax.tree_util.tree_map_with_path(leaf, abstract_variables(model))


def spread(values, fmt: str = "{:,.1f}") -> str:
    """"median (min-max)" of the finite values, or "failed" when there are none."""
    a = np.asarray([v for v in values if v is not None and np.isfinite(v)], float)
    if not len(a):
        return "failed"
    return f"{fmt.format(np.median(a))} ({fmt.format(a.min())}-{fmt.format(a.max())})"
