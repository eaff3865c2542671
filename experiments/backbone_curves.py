"""Per-epoch held-out accuracy of backbone runs, side by side (and as a plot).

    python experiments/backbone_curves.py runs/recipe/A runs/recipe/B [--plot curves.png]

Reads each workdir's metrics.jsonl: the held-out O1/O2 accuracy logged after every epoch
(the images held out of training for the expert and calibration, never test), the training
images/s, and the test accuracy if the stage finished. Settings are compared on the held-out
columns only.

    python experiments/backbone_curves.py runs/cifar runs/long/e24 --fit 88,90

With --fit the runs are one recipe at several lengths: it fits test O2 = a + b * log2(epochs)
(least squares) and prints, for each target accuracy, the epochs the fit puts it at and the
hours they take at the seconds per epoch of the fastest run (one that shared the machine
reads slow). An extrapolation of a trend, not a measurement: it says how far a recipe is
from a target, not that it would reach it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_run(workdir: Path) -> dict:
    recs = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    bb = [r for r in recs if r.get("stage") == "backbone"]
    epochs = [r for r in bb if r.get("event") == "epoch"]
    rates = [r["img_per_s"] for r in bb if "img_per_s" in r]
    test = [r for r in bb if r.get("event") == "test"]
    cfg = json.loads((workdir / "config.json").read_text())
    return {"name": workdir.name, "epochs": epochs, "img_per_s": rates[-1] if rates else None,
            "test": test[-1] if test else None, "cfg": cfg}


def fit_epochs(runs: list[dict], targets: list[float]) -> None:
    import numpy as np
    done = [r for r in runs if r["test"]]
    epochs = np.array([r["cfg"]["epochs"] for r in done], float)
    if len(set(epochs)) < 2:
        raise SystemExit("--fit needs finished runs of at least two lengths")
    o2 = np.array([100 * r["test"]["test_accuracy"]["O2"] for r in done])
    b, a = np.polyfit(np.log2(epochs), o2, 1)
    # The fastest run's rate: a run that shared the machine reads slow.
    per_epoch = [r["test"]["train_seconds"] / r["cfg"]["epochs"] for r in done]
    fastest = int(np.argmin(per_epoch))
    s_per_epoch = per_epoch[fastest]
    print(f"fit over {len(done)} runs: test O2 = {a:.2f} + {b:.2f} * log2(epochs) "
          f"({b:.2f} points per doubling); {s_per_epoch:.0f} s per epoch in "
          f"{done[fastest]['name']}")
    print("| target test O2 | epochs (fit) | hours at that rate |")
    print("|---:|---:|---:|")
    for t in targets:
        e = 2 ** ((t - a) / b) if b > 0 else float("inf")
        print(f"| {t:.1f}% | {e:.0f} | {e * s_per_epoch / 3600:.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdirs", nargs="+", type=Path)
    p.add_argument("--plot", type=Path, default=None, help="write O1/O2 per epoch as a PNG")
    p.add_argument("--fit", default=None, metavar="ACC,...",
                   help="target test O2 accuracies in %% (e.g. 88,90): extrapolate the epochs "
                        "that reach them from the runs' test O2 against log2(epochs)")
    args = p.parse_args()
    runs = [read_run(w) for w in args.workdirs]
    print("| run | epoch | held-out O1 | held-out O2 |")
    print("|---|---:|---:|---:|")
    for r in runs:
        for e in r["epochs"]:
            print(f"| {r['name']} | {e['epoch']} | {e['heldout_O1']:.4f} | {e['heldout_O2']:.4f} |")
    print()
    print("| run | epochs (of config) | img/s | test O1 | test O2 | train s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in runs:
        t = r["test"]
        acc = t["test_accuracy"] if t else {}
        rate = f"{r['img_per_s']:.1f}" if r["img_per_s"] else "-"
        print(f"| {r['name']} | {len(r['epochs'])} ({r['cfg']['epochs']}) | {rate} | "
              f"{acc.get('O1', float('nan')):.4f} | {acc.get('O2', float('nan')):.4f} | "
              f"{t['train_seconds']:.0f} |" if t else
              f"| {r['name']} | {len(r['epochs'])} ({r['cfg']['epochs']}) | {rate} | - | - | - |")
    if args.fit:
        print()
        fit_epochs(runs, [float(t) for t in args.fit.split(",")])
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in runs:
            ep = [e["epoch"] for e in r["epochs"]]
            line, = ax.plot(ep, [e["heldout_O2"] for e in r["epochs"]], "o-",
                            label=f"{r['name']} O2")
            ax.plot(ep, [e["heldout_O1"] for e in r["epochs"]], "s--", color=line.get_color(),
                    label=f"{r['name']} O1")
        ax.set_xlabel("epoch")
        ax.set_ylabel("held-out accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
