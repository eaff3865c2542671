"""O1 and the last exit on the held-out images the experts train on (never the calibration
split) and on test, for several trained workdirs: recipes compared as the backbone stage
now reports them (issue 35, item 5: the calibration split must not help choose a model).

    python experiments/heldout_gaps.py --data-dir ../shared/datasets/imagenette-224 \
        --out docs/results/imagenette-heldout-gaps.json runs/imagenette/rrc30_96 ...

Each workdir is read with its own config; the JSON lists one record per workdir: its exit
gap on the held-out images (`diagnostics.exit_gap`: accuracies, difference and its standard
error) and its test accuracies.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnneb_jax import checkpoints, data as data_lib, diagnostics  # noqa: E402
from cnneb_jax.backbone_stage import heldout_split  # noqa: E402
from cnneb_jax.evaluation import predict_all  # noqa: E402
from cnneb_jax.workdir import load_backbone  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdirs", nargs="+")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    result = []
    for w in args.workdirs:
        cfg = checkpoints.load_config(Path(w))
        d = data_lib.load_dataset(cfg, args.data_dir)
        model, variables = load_backbone(Path(w), cfg)
        x, y = heldout_split(d)
        held = predict_all(model, variables, x, cfg.eval_batch_size)
        test = predict_all(model, variables, d["test_images"], cfg.eval_batch_size)
        y_test = np.asarray(d["test_labels"])
        result.append({"workdir": w, "seed": cfg.seed, "image_size": cfg.image_size,
                       "heldout": diagnostics.exit_gap(held["exits"], y),
                       "test": {f"O{i + 1}": float((o.argmax(-1) == y_test).mean())
                                for i, o in enumerate(test["exits"])}})
        g = result[-1]["heldout"]
        print(f"{w}: held-out ({g['images']}) O1 {g['O1']:.2%}, O2 {g['O2']:.2%}, "
              f"{100 * g['difference']:+.2f} ± {100 * g['standard_error']:.2f} pt; test "
              + ", ".join(f"{k} {v:.2%}" for k, v in result[-1]["test"].items()), flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
