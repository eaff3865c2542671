"""XLA:CPU's LLVM optimisation level for the cascade's programs: seconds to compile every
program `api.load` compiles, and routing images/s, at the default level (2) and at the
level the controller uses (1), measured in one run with the compilation cache off.

    python experiments/compile_level.py --workdir pretrained/cifar --data-dir ../shared/datasets/cifar10-jpeg

Routing is timed on test images at a fixed threshold per rule, in interleaved rounds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ["CNNEB_COMPILE_CACHE"] = "off"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from cnneb_jax import api, checkpoints, controller, data as data_lib  # noqa: E402


def cascade_at(workdir: str, level: int | None, max_batch: int):
    """A cascade whose programs are compiled at `level` (None: XLA's default)."""
    c = api.load(workdir, max_batch=max_batch, warm=False)
    real = controller._compile

    def compile_at(lowered):
        if level is None:
            return lowered.compile()
        return lowered.compile(compiler_options={"xla_backend_optimization_level": level})
    controller._compile = compile_at
    try:
        t = time.perf_counter()
        n = controller.warm_up(c)
        return c, n, time.perf_counter() - t
    finally:
        controller._compile = real


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="pretrained/cifar")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    cfg = checkpoints.load_config(Path(args.workdir))
    x = np.asarray(data_lib.load_dataset(cfg, args.data_dir)["test_images"][:args.images])
    cascades = {}
    for name, level in (("default (2)", None), ("level 1", 1)):
        c, n, sec = cascade_at(args.workdir, level, args.max_batch)
        cascades[name] = c
        print(f"{name}: compiled {n} programs in {sec:.1f} s")
    points = (("expert", 0.2), ("max_softmax", 0.9))
    rates = {(name, rule): [] for name in cascades for rule, _ in points}
    for r in range(args.rounds):
        order = list(cascades.items()) if r % 2 == 0 else list(cascades.items())[::-1]
        for name, c in order:
            for rule, t in points:
                controller.run_cascade(c, x[:c.max_batch], rule, t)
                start = time.perf_counter()
                controller.run_cascade(c, x, rule, t)
                rates[name, rule].append(len(x) / (time.perf_counter() - start))
    for rule, t in points:
        a, b = (np.array(rates[name, rule]) for name in cascades)
        print(f"{rule} (threshold {t}): default {np.median(a):.0f} img/s, level 1 "
              f"{np.median(b):.0f} img/s; level 1 / default per round: median "
              f"{np.median(b / a):.3f} (min {np.min(b / a):.3f}, max {np.max(b / a):.3f})")


if __name__ == "__main__":
    main()
