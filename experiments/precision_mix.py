"""Which parts of the shipped model can run in bfloat16 and still give float32's labels?

bfloat16 everywhere gives float32's labels on 99.59% (O1) and 99.66% (O2) of the test
images (bench/precision_agreement.py), short of issue 31's 99.8%. This runs each segment
(stem -> Mixed_5b, Mixed_5b -> end) and the heads in either precision, in the mixes named
on the command line, and prints each exit's label agreement with float32 and its accuracy.

    python experiments/precision_mix.py --workdir pretrained/cifar \
        --data-dir ../shared/datasets/cifar10-jpeg --mixes bbb fbb bff fbf ffb

A mix is three letters, f (float32) or b (bfloat16), for segment 0, the later segments and
the heads; for segment 0 also s, t or m: bfloat16 but for the images and the first
convolution (s: Conv2d_1a_3x3), the whole stem (t: Conv2d_1a to 4a) or the Inception block
(m: Mixed_5b) in float32, or all but the full-resolution stem (l: Conv2d_3b, 4a and Mixed_5b)
or all but the first two convolutions (e) in float32 (each convolution computes in its
kernel's dtype).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import numpy as np

from cnneb_jax import data as data_lib
from cnneb_jax.augment import normalize
from cnneb_jax.model import _logits_f32, build_model, eval_apply, inference_variables
from cnneb_jax.workdir import load_trained


# Segment-0 mixes: which of its blocks keep float32 variables (and so compute in float32).
F32_BLOCKS = {"s": lambda b: b == "Conv2d_1a_3x3", "t": lambda b: b.startswith("Conv2d_"),
              "m": lambda b: b == "Mixed_5b",
              # the full-resolution stem (1a, 2a, 2b) in bfloat16, the rest of segment 0 float32
              "l": lambda b: b in ("Conv2d_3b_1x1", "Conv2d_4a_3x3", "Mixed_5b"),
              # only the first two convolutions in bfloat16
              "e": lambda b: b not in ("Conv2d_1a_3x3", "Conv2d_2a_3x3")}


def exit_logits(models: dict, variables: dict, mix: str, images: np.ndarray,
                batch_size: int) -> list[np.ndarray]:
    """Every exit's logits with segment 0, the later segments and the heads in the dtypes
    that `mix` names."""
    base = models["f"]
    names, heads = list(base.segments), list(base.heads)

    def run(x):
        h, out = normalize(x, base.cfg.input_norm), []
        for i, name in enumerate(names):
            d = mix[0] if i == 0 else mix[1]
            if d in F32_BLOCKS:   # uncast input, the named blocks' variables from float32
                v = variables["b"]["segments"][name]
                params = {**v["params"], **{b: variables["f"]["segments"][name]["params"][b]
                                            for b in v["params"] if F32_BLOCKS[d](b)}}
                h = _logits_f32(models["b"].segments[name].apply({**v, "params": params}, h,
                                                                 train=False))
            else:
                h = eval_apply(models[d].segments[name], variables[d]["segments"][name], h)
            out.append(eval_apply(models[mix[2]].heads[heads[i]],
                                  variables[mix[2]]["heads"][heads[i]], h))
        return out
    run = jax.jit(run)
    got = [run(images[s:s + batch_size]) for s in range(0, len(images), batch_size)]
    return [np.concatenate([np.asarray(g[i]) for g in got]) for i in range(len(names))]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--mixes", nargs="+", default=["bbb", "fbb", "bbf", "fbf"])
    p.add_argument("--batch-size", type=int, default=500)
    args = p.parse_args(argv)
    model, variables = load_trained(args.workdir)
    data = data_lib.load_dataset(model.cfg, args.data_dir)
    images, labels = data["test_images"], data["test_labels"]
    models, cast = {}, {}
    for d, dtype in (("f", "float32"), ("b", "bfloat16")):
        cfg = dataclasses.replace(model.cfg, compute_dtype=dtype)
        models[d], cast[d] = build_model(cfg), inference_variables(cfg, variables)
    ref = [o.argmax(-1) for o in exit_logits(models, cast, "fff", images, args.batch_size)]
    print(f"{args.workdir}: {len(labels)} test images; reference float32 everywhere: "
          + ", ".join(f"O{i + 1} {(r == labels).mean():.2%}" for i, r in enumerate(ref)))
    print("\n| segment 0 | later segments | heads | " + " | ".join(
        f"O{i + 1} same label | O{i + 1} accuracy" for i in range(len(ref))) + " | seconds |")
    print("|---|---|---|" + "---:|---:|" * len(ref) + "---:|")
    word = {"f": "float32", "b": "bfloat16", "s": "bfloat16, Conv2d_1a_3x3 float32",
            "t": "bfloat16, stem float32", "m": "bfloat16, Mixed_5b float32",
            "l": "bfloat16, Conv2d_3b to Mixed_5b float32",
            "e": "bfloat16, Conv2d_2b to Mixed_5b float32"}
    for mix in args.mixes:
        start = time.perf_counter()
        preds = [o.argmax(-1) for o in exit_logits(models, cast, mix, images, args.batch_size)]
        seconds = time.perf_counter() - start
        cells = []
        for i, pr in enumerate(preds):
            cells += [f"{(pr == ref[i]).mean():.2%}", f"{(pr == labels).mean():.2%}"]
        print(f"| {word[mix[0]]} | {word[mix[1]]} | {word[mix[2]]} | " + " | ".join(cells)
              + f" | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
