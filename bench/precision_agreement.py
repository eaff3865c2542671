"""Does a trained cascade answer the same in bfloat16 as in float32? Its exits' predicted
labels and accuracies on every test image, at each compute dtype and kernel library.

    python bench/precision_agreement.py --workdir pretrained/cifar \
        --data-dir ../shared/datasets/cifar10-jpeg

The reference is float32 with XLA's kernels (what the model was trained and evaluated
with). Every other row gives, per exit, the share of test images whose predicted label
equals the reference's, and the accuracy beside the reference's. The issue's bar for a
faster inference precision: labels equal on at least 99.8% of the images, O1 and O2
accuracy within 0.2 points.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

import benchlib
from cnneb_jax import data as data_lib
from cnneb_jax import onednn as onednn_lib
from cnneb_jax.evaluation import predict_all
from cnneb_jax.model import build_model, inference_variables
from cnneb_jax.workdir import load_trained

# bfloat16_deep: segment 0 in float32, the rest in bfloat16 (configs.py). bfloat16_checked
# (bfloat16, close calls rerun in float32) follows as its own row when the workdir has margins.
ROWS = [("float32", "off"), ("float32", "on"), ("bfloat16", "on"), ("bfloat16", "off"),
        ("bfloat16_deep", "on")]


def main(argv: list[str] | None = None) -> None:
    p = benchlib.parser(__doc__)
    p.add_argument("--workdir", required=True, help="a trained workdir or release folder")
    p.add_argument("--data-dir", default=None, help="the image folder (default: tfds)")
    p.add_argument("--batch-size", type=int, default=500)
    args = p.parse_args(argv)
    model, variables = load_trained(args.workdir)
    data = data_lib.load_dataset(model.cfg, args.data_dir)
    images, labels = data["test_images"], data["test_labels"]
    print(f"{args.workdir}: {len(labels)} test images, config {model.cfg.name}")
    ref, outputs = None, {}
    print("| compute dtype | oneDNN | " + " | ".join(
        f"O{i + 1} same label | O{i + 1} accuracy" for i in range(model.num_exits))
        + " | seconds |")
    print("|---|---|" + "---:|---:|" * model.num_exits + "---:|")
    # oneDNN's rows where its kernels are built here (setup.sh builds them).
    for dtype, onednn in [r for r in ROWS if r[1] == "off" or onednn_lib.available()]:
        cfg = dataclasses.replace(model.cfg, compute_dtype=dtype, onednn=onednn)
        m = build_model(cfg)
        start = time.perf_counter()
        out = predict_all(m, inference_variables(cfg, variables), images, args.batch_size)
        seconds = time.perf_counter() - start
        outputs[dtype, onednn] = [np.asarray(o) for o in out["exits"]]
        preds = [o.argmax(-1) for o in outputs[dtype, onednn]]
        ref = ref or preds
        cells = []
        for i, pr in enumerate(preds):
            cells += [f"{(pr == ref[i]).mean():.2%}", f"{(pr == labels).mean():.2%}"]
        print(f"| {dtype} | {onednn} | " + " | ".join(cells) + f" | {seconds:.1f} |",
              flush=True)
    # the checked cascade runs oneDNN's kernels where they are built (onednn "auto")
    checked_row(args, images, labels, ref,
                outputs.get(("bfloat16", "on"), outputs[("bfloat16", "off")]))


def checked_row(args, images: np.ndarray, labels: np.ndarray, ref: list[np.ndarray],
                bf16: list[np.ndarray]) -> None:
    """bfloat16_checked through the library (api.load; its margins stored with the
    workdir, chosen on held-out images): bfloat16, each exit's close calls rerun in float32.
    `bf16`: each exit's bfloat16 logits (the row above), whose close calls were rerun."""
    from cnneb_jax import api
    from cnneb_jax.controller import all_outputs
    from cnneb_jax.recheck import close_calls
    try:
        point = api.read_recheck(args.workdir)
        c = api.load(args.workdir, max_batch=args.batch_size, warm=False,
                     compute_dtype="bfloat16_checked")
    except ValueError as e:
        print(f"(no bfloat16_checked row: {e})")
        return
    start = time.perf_counter()
    out = all_outputs(c, images)["exits"]
    seconds = time.perf_counter() - start
    cells = []
    for i, o in enumerate(out):
        cells += [f"{(o.argmax(-1) == ref[i]).mean():.2%}", f"{(o.argmax(-1) == labels).mean():.2%}"]
    print("| bfloat16_checked | on | " + " | ".join(cells) + f" | {seconds:.1f} |")
    shares = [close_calls(o, m).mean() for o, m in zip(bf16, c.recheck.margins)]
    print(f"\nbfloat16_checked: margins {', '.join(f'{m:.4f}' for m in c.recheck.margins)} "
          f"(chosen on {point.get('images', '?')} held-out images, target "
          f"{point.get('target', '?')}); rerun in float32: "
          + ", ".join(f"O{i + 1} {s:.2%}" for i, s in enumerate(shares)) + " of the test images")


if __name__ == "__main__":
    main()
