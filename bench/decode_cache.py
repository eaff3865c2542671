"""What the decoded-image cache costs: listing the folder and keying the cache, the first
read (decode every file, write the cache) and a warm read (key, then load the cache).

    python bench/decode_cache.py --data-dir ../shared/datasets/cifar10-jpeg [--tree DIR]

`--tree` imports cnneb_jax from another checkout (e.g. a worktree of an older commit) to
compare before and after. Each figure is the median of --repeats fresh runs of that step
(the first read once: it writes the cache the others read), in a fresh cache folder.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import benchlib


def main(argv: list[str] | None = None) -> None:
    p = benchlib.parser(__doc__)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--tree", default=str(Path(__file__).resolve().parent.parent),
                   help="the checkout whose cnneb_jax is timed (default: this one)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    sys.path.insert(0, args.tree)
    from cnneb_jax import data

    root = Path(args.data_dir)
    cache = Path(tempfile.mkdtemp(prefix="cnneb-decode-cache-"))
    timings: dict[str, list[float]] = {"list and key": [], "first read": [], "warm read": []}
    for _ in range(args.repeats):
        t = time.perf_counter()
        data.load_folder_files(root)
        timings["list and key"].append(time.perf_counter() - t)
    t = time.perf_counter()
    first = data.load_image_folder(root, cache)
    timings["first read"].append(time.perf_counter() - t)
    for _ in range(args.repeats):
        t = time.perf_counter()
        data.load_image_folder(root, cache)
        timings["warm read"].append(time.perf_counter() - t)
    n = sum(len(v) for k, v in first.items() if k.endswith("_labels"))
    print(f"{root} ({n} images), cnneb_jax from {args.tree}")
    for name, ts in timings.items():
        print(f"{name}: {benchlib.spread(ts, '{:.2f}')} s")


if __name__ == "__main__":
    main()
