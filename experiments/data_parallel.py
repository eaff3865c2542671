"""Training images/s of the backbone step on 1 vs N forced CPU devices, same global batch.

    python experiments/data_parallel.py --config cifar --devices 4 --steps 6

Each device count runs in its own process (XLA_FLAGS must be set before JAX starts). On a
2-core CPU expect no speedup: this shows the sharded path runs, not that it is faster.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, sys, time
import jax, numpy as np
from cnneb_jax import distributed as dist
from cnneb_jax.backbone_stage import make_backbone_step
from cnneb_jax.optim import make_optimizer
from cnneb_jax.configs import get_config
from cnneb_jax.model import build_model, init_variables, split_collections
cfg = get_config(sys.argv[1]); steps = int(sys.argv[2])
cfg = cfg.replace(num_classes=cfg.num_classes or 10)  # CIFAR-10 unless set
model = build_model(cfg)
v = init_variables(model, jax.random.PRNGKey(0))
params, stats = split_collections({g: v[g] for g in ("segments", "heads")})
tx = make_optimizer(cfg.lr, 100, 10, cfg.weight_decay, cfg.momentum)
mesh = dist.data_mesh()
state = dist.replicate(mesh, {"params": params, "stats": stats, "opt": tx.init(params)})
step = make_backbone_step(model, cfg, tx)
rng = np.random.default_rng(0)
x = rng.integers(0, 255, (cfg.batch_size, cfg.image_size, cfg.image_size, 3), np.uint8)
y = rng.integers(0, cfg.num_classes, cfg.batch_size)
times = []
for i in range(steps + 1):
    t = time.perf_counter()
    state, m = step(state, *dist.shard_batch(mesh, x, y), jax.random.PRNGKey(i))
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
print(json.dumps({"devices": jax.device_count(),
                  "img_per_s": cfg.batch_size / float(np.median(times[1:]))}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="cifar")
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--steps", type=int, default=6, help="timed steps (after one warm-up)")
    args = p.parse_args()
    root = Path(__file__).resolve().parents[1]
    rates = {}
    for n in (1, args.devices):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}",
               "PYTHONPATH": str(root)}
        r = subprocess.run([sys.executable, "-c", CHILD, args.config, str(args.steps)],
                           env=env, capture_output=True, text=True, check=True)
        rates[n] = json.loads(r.stdout.strip().splitlines()[-1])["img_per_s"]
        print(f"{n} device(s): {rates[n]:.1f} images/s (backbone train step, "
              f"{args.config} config, median of {args.steps} steps)")
    print(f"ratio {args.devices} vs 1 device: {rates[args.devices] / rates[1]:.2f}")


if __name__ == "__main__":
    main()
