"""Per-epoch held-out accuracy of backbone runs, side by side (and as a plot).

    python bench/backbone_curves.py runs/recipe/A runs/recipe/B [--plot curves.png]

Reads each workdir's metrics.jsonl: the held-out O1/O2 accuracy logged after every epoch
(the images held out of training for the expert and calibration, never test), the training
images/s, and the test accuracy if the stage finished. Settings are compared on the held-out
columns only.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdirs", nargs="+", type=Path)
    p.add_argument("--plot", type=Path, default=None, help="write O1/O2 per epoch as a PNG")
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
