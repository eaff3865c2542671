"""Seconds for `api.load` (warm: every bucket size compiled) in fresh processes: a first
load with an empty persistent compilation cache, then a second one reading it, then a
`predict` that must compile nothing.

    python bench/load_time.py --workdir pretrained/cifar --max-batch 256
    python bench/load_time.py --workdir pretrained/cifar --compute-dtype bfloat16_checked

Each load runs in its own Python process (as a user's would), with its own empty cache
folder for this run; CNNEB_COMPILE_CACHE=off measures loads without the cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import benchlib

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import jax, numpy as np
from cnneb_jax import api
t1 = time.perf_counter()
c = api.load(sys.argv[1], max_batch=int(sys.argv[2]), compute_dtype=sys.argv[3] or None)
t2 = time.perf_counter()
compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *a, **k: compiles.append(name) if name.endswith("backend_compile_duration")
    else None)
x = np.random.default_rng(0).integers(0, 256, (300, 32, 32, 3), np.uint8)
for rule in ("expert", "max_softmax"):
    api.predict(c, x, rule, 0.5)
    api.predict(c, x[:37].astype(np.float32) / 255, rule, 0.5)
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "predict_compiles": len(compiles)}))
"""


def run_once(workdir: str, max_batch: int, env: dict, compute_dtype: str = "") -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, workdir, str(max_batch), compute_dtype],
                       env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = benchlib.parser(__doc__)
    p.add_argument("--workdir", default="pretrained/cifar")
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--compute-dtype", default="",
                   help="load in this precision (api.load's compute_dtype; default the "
                        "workdir's own), e.g. bfloat16_checked: its float32 reruns compile too")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cnneb-load-") as cache:
        env = dict(os.environ)
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        if env.get("CNNEB_COMPILE_CACHE", "").lower() not in ("0", "off", "false", "no"):
            env["CNNEB_COMPILE_CACHE"] = cache
        for name in ("first load", "second load"):
            r = run_once(args.workdir, args.max_batch, env, args.compute_dtype)
            print(f"{name}: api.load {r['load_s']:.1f} s (imports {r['import_s']:.1f} s), "
                  f"compilations during predict afterwards: {r['predict_compiles']}")


if __name__ == "__main__":
    main()
