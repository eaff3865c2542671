"""A small image folder where a mirror image is another class: for `flip=none` and the
backbone's confused-pairs report (issue 36).

    python experiments/mirror_classes.py --data-dir ../shared/datasets/cifar10-jpeg \
        --out runs/mirror-data [--classes airplane,cat,ship,truck] [--train 500 --test 100]

Each source class X gives two classes: `X_left` (the picture shrunk to 24x24 and placed at
the left of a 32x32 black frame) and `X_right` (the same pictures mirrored, so placed at the
right and facing the other way), like road signs that differ only by direction. Different
source pictures go to the two classes. Train with the default `flip=alternate` and the
mirrored training images teach the wrong class; with `flip=none` they do not.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def make(src: Path, out: Path, classes: list[str], per_split: dict[str, int]) -> None:
    for split, n in per_split.items():
        for cls in classes:
            files = sorted((src / split / cls).iterdir())
            if len(files) < 2 * n:
                raise SystemExit(f"{src / split / cls} has {len(files)} images, needs {2 * n}")
            for side, chunk in (("left", files[:n]), ("right", files[n:2 * n])):
                d = out / split / f"{cls}_{side}"
                d.mkdir(parents=True, exist_ok=True)
                for f in chunk:
                    with Image.open(f) as im:
                        small = np.asarray(im.convert("RGB").resize((24, 24), Image.BILINEAR))
                    frame = np.zeros((32, 32, 3), np.uint8)
                    frame[4:28, :24] = small
                    if side == "right":
                        frame = frame[:, ::-1]
                    Image.fromarray(frame).save(d / f"{f.stem}.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="an image folder with train/ and test/")
    p.add_argument("--out", required=True)
    p.add_argument("--classes", default="airplane,cat,ship,truck")
    p.add_argument("--train", type=int, default=500, help="images per new class in train/")
    p.add_argument("--test", type=int, default=100, help="images per new class in test/")
    args = p.parse_args()
    make(Path(args.data_dir), Path(args.out), args.classes.split(","),
         {"train": args.train, "test": args.test})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
