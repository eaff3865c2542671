"""Class-balanced loss weights on an imbalanced image folder (issue 36).

    python experiments/class_balance.py make --data-dir ../shared/datasets/cifar10-jpeg \
        --out runs/imbalanced-data [--largest 1000 --ratio 10]
    python train.py --stage backbone --config cifar --workdir runs/imbalanced/none-s0 \
        --data-dir runs/imbalanced-data --set epochs=10 --set lowres_epochs=7 \
        --set val_size=800 --set calib_size=200 [--set class_balance=loss] [--set seed=1]
    python experiments/class_balance.py summarize runs/imbalanced/*

`make` links CIFAR-10 training images into a folder whose classes shrink geometrically from
`--largest` images (the first class) to `--largest / --ratio` (the last); the test split
keeps all 1,000 images of every class, so test accuracy is the balanced one. `summarize`
reads each backbone stage's result.json: held-out accuracy (drawn from the same imbalanced
split), held-out balanced accuracy (the mean over classes), and the smallest class's
held-out accuracy, per exit; then test accuracy (balanced).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np


def make(src: Path, out: Path, largest: int, ratio: float) -> None:
    classes = sorted(d.name for d in (src / "train").iterdir() if d.is_dir())
    k = len(classes)
    for c, cls in enumerate(classes):
        n = int(round(largest * ratio ** (-c / (k - 1))))
        for split, count in (("train", n), ("test", None)):
            files = sorted((src / split / cls).iterdir())[:count]
            d = out / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for f in files:
                if not (d / f.name).exists():
                    os.symlink(f.resolve(), d / f.name)
        print(f"{cls}: {n} training images")


def summarize(workdirs: list[Path]) -> None:
    print("| workdir | class_balance | seed | held-out O1 / O2 | held-out balanced O1 / O2 "
          "| smallest class, held-out O1 / O2 | test (balanced) O1 / O2 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for w in workdirs:
        r = json.loads((w / "backbone" / "result.json").read_text())
        cfg = json.loads((w / "config.json").read_text())
        rep = r["heldout_report"]
        gap, cells = rep["exit_gap"], []
        names = sorted(rep["classes"])
        per = {e: rep["classes"][e]["per_class"] for e in names}
        smallest = list(per[names[0]])[-1]   # classes in label order: the last is smallest
        cells.append(" / ".join(f"{gap[e]:.1%}" for e in names))
        cells.append(" / ".join(f"{np.mean([v for v in per[e].values() if v is not None]):.1%}"
                                for e in names))
        cells.append(" / ".join(f"{per[e][smallest]:.1%}" for e in names))
        cells.append(" / ".join(f"{r['test_accuracy'][e]:.1%}" for e in names))
        print(f"| {w.name} | {cfg['class_balance']} | {cfg['seed']} | " + " | ".join(cells)
              + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--data-dir", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--largest", type=int, default=1000)
    m.add_argument("--ratio", type=float, default=10.0)
    s = sub.add_parser("summarize")
    s.add_argument("workdirs", nargs="+", type=Path)
    args = p.parse_args()
    if args.cmd == "make":
        make(Path(args.data_dir), Path(args.out), args.largest, args.ratio)
    else:
        summarize(args.workdirs)


if __name__ == "__main__":
    main()
