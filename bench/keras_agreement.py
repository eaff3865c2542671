"""Do imported Keras weights give Keras' logits? `keras.applications.InceptionV3` built
here (weights=None: no pretrained file can be downloaded here; the import path is the same),
its BatchNorm offsets and statistics perturbed so that they matter, read into the `full`
config by cnneb_jax/keras_import.py, and both run in float32 on the same random images.

    python bench/keras_agreement.py [--size 299] [--images 8]

Prints, per kernel library (XLA's, oneDNN's where built), the largest absolute logit
difference divided by the largest Keras logit, and whether the predicted classes agree.
The issue's bar: at most 1e-4.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import benchlib
from cnneb_jax import onednn
from cnneb_jax.configs import get_config
from cnneb_jax.keras_import import import_keras, random_keras_model
from cnneb_jax.model import abstract_variables, branch_fn, build_model

os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def main(argv: list[str] | None = None) -> None:
    p = benchlib.parser(__doc__)
    p.add_argument("--size", type=int, default=299, help="image size (Keras: at least 75)")
    p.add_argument("--images", type=int, default=8, help="random images (default 8)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    km = random_keras_model(args.size, seed=args.seed, perturb_bn=True)
    x = np.random.default_rng(args.seed + 1).uniform(
        0, 255, (args.images, args.size, args.size, 3)).astype(np.float32)
    ref = np.asarray(km(x / 127.5 - 1.0, training=False))
    scale = float(np.abs(ref).max())
    print(f"Keras InceptionV3(weights=None) at {args.size}x{args.size}, BatchNorm perturbed, "
          f"{args.images} random images; largest |logit| {scale:.4g}")
    print("| kernels | max abs diff / max abs logit | top-1 equal |")
    print("|---|---:|---:|")
    libraries = ["off"] + (["on"] if onednn.available() else [])
    for lib in libraries:
        cfg = get_config("full", {"image_size": str(args.size), "input_norm": "inception",
                                  "onednn": lib})
        model = build_model(cfg)
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                       abstract_variables(model))
        t0 = time.perf_counter()
        variables, report = import_keras(km, model, zeros)
        t_import = time.perf_counter() - t0
        h, _ = jax.jit(branch_fn(model, 0, "plain"))(variables, x)
        ours = np.asarray(jax.jit(branch_fn(model, 1, "plain"))(variables, h))
        rel = float(np.abs(ours - ref).max()) / scale
        same = float((ours.argmax(-1) == ref.argmax(-1)).mean())
        name = "XLA" if lib == "off" else "oneDNN"
        print(f"| {name} | {rel:.2e} | {same:.0%} |")
    print(f"imported {report['conv_layers']} conv layers and {report['heads']} in "
          f"{t_import:.2f} s; fresh: {report['fresh']}")


if __name__ == "__main__":
    main()
