"""Predictions on a folder of image files (evaluate.py --predict): the CSV and its summary.
The rows come from `api.predict_files`."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

COLUMNS = ("path", "label", "class_name", "exit", "probability", "flops", "error")


def write_csv(rows: list[dict], path: str | Path) -> None:
    """One line per file, COLUMNS in order; empty fields where a file had an error. Written
    to a temporary name first, so a crash never leaves half a file under `path`."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; --out takes the CSV file's path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMNS})
    tmp.replace(path)


def summarize(rows: list[dict], seconds: float, num_exits: int,
              reference_flops: float | None = None,
              class_names: tuple[str, ...] | None = None) -> dict:
    """Files, errors, the share leaving at each exit, images/s, mean FLOPs (and the saving
    against the last exit alone), and, for files inside folders named for a class, the
    accuracy on them."""
    done = [r for r in rows if r["error"] is None]
    exits = Counter(r["exit"] for r in done)
    out = {"files": len(rows), "errors": len(rows) - len(done),
           "exit_share": {f"O{i + 1}": exits[f"O{i + 1}"] / len(done) if done else 0.0
                          for i in range(num_exits)},
           "images_per_s": len(done) / seconds if seconds > 0 else float("nan")}
    if done:
        out["mean_flops"] = sum(r["flops"] for r in done) / len(done)
        if reference_flops:
            out["flops_saved"] = 1.0 - out["mean_flops"] / reference_flops
    if class_names:
        labelled = [r for r in done if Path(r["path"]).parent.name in class_names]
        if labelled:
            right = sum(class_names.index(Path(r["path"]).parent.name) == r["label"]
                        for r in labelled)
            out["folder_accuracy"] = right / len(labelled)
            out["folder_labelled"] = len(labelled)
    return out


def format_summary(s: dict) -> str:
    lines = [f"{s['files']} files, {s['errors']} unreadable; "
             f"{s['images_per_s']:.1f} images/s",
             "exits: " + ", ".join(f"{k} {v:.1%}" for k, v in s["exit_share"].items())]
    if "mean_flops" in s:
        saved = ""
        if "flops_saved" in s:
            side = "below" if s["flops_saved"] >= 0 else "above"
            saved = f" ({abs(s['flops_saved']):.1%} {side} the last exit alone)"
        lines.append(f"mean FLOPs per image: {s['mean_flops']:.4g}{saved}")
    if "folder_accuracy" in s:
        lines.append(f"accuracy on the {s['folder_labelled']} files in class-named folders: "
                     f"{s['folder_accuracy']:.2%}")
    return "\n".join(lines)
