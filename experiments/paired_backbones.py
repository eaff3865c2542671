"""Two trained backbones on the same held-out images: each exit's accuracy and the paired
difference with its standard error (the images the experts train on, never the
calibration split; issue 31's "ship it if held-out O2 improves").

    python experiments/paired_backbones.py runs/s33/e20 pretrained/cifar \
        --data-dir ../shared/datasets/cifar10-jpeg

The first is the candidate, the second the reference; both must have trained on the same
split (the config's seed and sizes), which the data's lineage digest checks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnneb_jax import data as data_lib  # noqa: E402
from cnneb_jax.backbone_stage import heldout_split  # noqa: E402
from cnneb_jax.evaluation import predict_all  # noqa: E402
from cnneb_jax.checkpoints import load_config  # noqa: E402
from cnneb_jax.diagnostics import paired_difference  # noqa: E402
from cnneb_jax.release import is_release  # noqa: E402
from cnneb_jax.workdir import check_data_lineage, load_backbone, load_trained  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("candidate")
    p.add_argument("reference")
    p.add_argument("--data-dir", required=True)
    args = p.parse_args(argv)
    right = {}
    for w in (args.candidate, args.reference):
        model, variables = _load(w)
        d = data_lib.load_dataset(model.cfg, args.data_dir)
        check_data_lineage(w, d, "comparing backbones")
        x, y = heldout_split(d)
        out = predict_all(model, variables, x, model.cfg.eval_batch_size)
        right[w] = [o.argmax(-1) == y for o in out["exits"]]
    print(f"held-out images: {len(y)}; candidate {args.candidate}, reference {args.reference}")
    print("\n| exit | candidate | reference | difference | standard error |")
    print("|---|---:|---:|---:|---:|")
    for i, (a, b) in enumerate(zip(right[args.candidate], right[args.reference])):
        diff, se = paired_difference(a, b)
        print(f"| O{i + 1} | {a.mean():.2%} | {b.mean():.2%} | {100 * diff:+.2f} pt | "
              f"{100 * se:.2f} pt |")


def _load(w: str):
    """A release's model, or a workdir's backbone (its expert stage need not have run)."""
    if is_release(w):
        return load_trained(w)
    return load_backbone(Path(w), load_config(Path(w)))


if __name__ == "__main__":
    main()
