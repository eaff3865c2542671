"""Wall-clock timing for the sweep and the benchmarks: medians of repeats after a warm
pass, interleaved rounds (each variant once per round, in a random order) so that a machine
whose speed drifts slows every variant alike, and single-image latency (mean, median, p95)."""

from __future__ import annotations

import time

import numpy as np

from cnneb_jax.programs import Cascade


def median_seconds(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def time_batch(c: Cascade, images: np.ndarray, run, repeats: int) -> float:
    """Milliseconds per image in batch mode (median over repeats, after one warm pass)."""
    run(images[:c.max_batch])
    return 1000.0 * median_seconds(lambda: run(images), repeats) / len(images)


def _latency(ms: list[float], prefix: str) -> dict[str, float]:
    ms = np.asarray(ms)
    return {f"{prefix}_mean": float(ms.mean()), f"{prefix}_p50": float(np.median(ms)),
            f"{prefix}_p95": float(np.percentile(ms, 95))}


def time_single(images: np.ndarray, run) -> dict[str, float]:
    """Milliseconds for one image at a time: mean (`ms_single`), median and p95."""
    run(images[:1])
    stats = _latency([1000.0 * _seconds(run, x[None]) for x in images], "ms_single")
    stats["ms_single"] = stats.pop("ms_single_mean")
    return stats


def _seconds(run, x) -> float:
    t = time.perf_counter()
    run(x)
    return time.perf_counter() - t


def paired_batch(images: np.ndarray, runs: dict, repeats: int,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """Seconds per image of every run, timed in interleaved rounds (A B C, C A B, ...), so
    that a machine whose speed drifts slows all of them alike; the order within each round
    is drawn at random (seeded), so no run always goes first or after the same one. One
    array per run, one entry per round. Each run is warmed once first."""
    for run in runs.values():
        run(images[:len(images) // 4 or 1])
    out = {k: [] for k in runs}
    rng = np.random.default_rng(seed)
    names = list(runs)
    for _ in range(repeats):
        for i in rng.permutation(len(names)):
            out[names[i]].append(_seconds(runs[names[i]], images) / len(images))
    return {k: np.array(v) for k, v in out.items()}


def paired_single(images: np.ndarray, run_ref, run_point) -> dict[str, float]:
    """Single-image latency (ms) of a point and of the reference on the same images, each
    image timed with both in alternating order. Latency is bimodal (leave at O1 or go deep),
    so mean, median and p95 are all reported; pass images in which both paths occur in
    their true share (`stratified`)."""
    run_ref(images[:1])
    run_point(images[:1])
    ref, pt = [], []
    for i, x in enumerate(images):
        pair = [(ref, run_ref), (pt, run_point)]
        for store, run in (pair if i % 2 == 0 else pair[::-1]):
            store.append(1000.0 * _seconds(run, x[None]))
    return {**_latency(pt, "ms_single"), **_latency(ref, "ref_single"),
            "single_saving": float(1.0 - np.mean(pt) / np.mean(ref))}


def stratified(exits: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Indices of n samples whose exits occur in the same shares as in `exits` (largest
    remainder rounding), drawn at random inside each exit."""
    rng = np.random.default_rng(seed)
    n = min(n, len(exits))
    values, counts = np.unique(exits, return_counts=True)
    quota = counts / counts.sum() * n
    take = np.floor(quota).astype(int)
    take[np.argsort(-(quota - take))[:n - take.sum()]] += 1
    idx = [rng.choice(np.nonzero(exits == v)[0], k, replace=False) for v, k in zip(values, take)]
    return rng.permutation(np.concatenate(idx))
