"""The learned experts given a fair budget (issue 35): epochs and learning rate chosen by
cross-validation on the expert split, then several seeds at the chosen setting.

    python experiments/expert_budget.py --workdir pretrained/cifar \
        --data-dir ../shared/datasets/cifar10-jpeg \
        --out docs/results/expert-budget.json --scores-out docs/results/expert-budget-scores.npz

The expert stage trains on the held-out images (the split the backbone never trained on;
its FT labels say where O1 is wrong and O2 right). This script caches what every expert
reads for `--views` augmented views of each of those images (`expert_cache.py`: the
backbone is frozen; saved as `features-<key>.npz` beside --out, so a rerun reads them back
instead of running the backbone again), then, for every expert:

1. cuts the images into `--folds` folds; each (learning rate, epochs) candidate trains on
   the views of all folds but one and is scored by ROC AUC (Other against FT) on the
   un-augmented images of the fold left out; the mean over folds chooses. The calibration
   split, which later certifies the thresholds, is never read here.
2. While the best candidate lies on an edge of the grid, the grid grows one step past it
   (learning rate x3 or /3, epochs x2 or /2); the new value is tried beside the best value
   of the other axis and its neighbours there (not across the whole grid), until the best
   lies inside on both axes (at most `--max-extensions` steps per side and axis; the JSON
   says if a choice stayed on an edge). A learning rate whose longest budget so far ended
   at a constant answer on every fold (AUC 0.5: it diverged) is not tried at a longer one,
   whether the epochs grow or that learning rate joins the grid beside longer budgets.
3. At the chosen setting, `--seeds` seeds train on all the held-out images; their
   calibration and test scores go to `--scores-out` (`compare_rules.py --expert-scores`
   reads them) and their test AUC, beside O1's max softmax, to `--out`. `--seed-list`
   shares the seeds out between processes.

Epoch e reads view e mod --views (more epochs than views re-read views, as in
`expert_cache.train_expert`). Progress is saved after every candidate and a rerun with the
same --out resumes from it (and from the folds done of a cell it stopped in), as do the
final seeds, saved one by one. Cells the search will need can run beside it, in another
process: `--probe LR:EPOCHS,...` with its own --out, which the search then takes in with
`--merge-from` (a cell is the same wherever it runs: its folds and seeds are fixed), and so
can the final seeds, ahead of the choice: `--seeds-at LR:EPOCHS` (kept by the merging run
only if its search chooses that cell). Not a
timing: seconds are recorded only to plan runs.

Experts: E1 as the shipped config builds it (O1-like layers + O1's softmax), E1 with O1's
pre-softmax output as the paper's Eq. (5) writes it (`expert_inputs=logits`), and the
Auxiliary+5b expert (an Inception-A block before the O1-like layers).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cnneb_jax.metrics import roc_auc  # noqa: E402
from cnneb_jax.model import build_model  # noqa: E402
from cnneb_jax.pipeline import materialize  # noqa: E402
import expert_cache as ec  # noqa: E402  (beside this script)

# name -> (model kind, expert_inputs)
EXPERTS = {"E1 (softmax)": ("experts", "paper"),
           "E1 (Eq. 5 logits)": ("experts", "logits"),
           "Aux+5b": ("aux5b", None)}


def folds_of(is_ft: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """Image indices cut into k folds, FT and Other images dealt out separately so that
    every fold holds about the same share of FT images."""
    rng = np.random.default_rng(seed)
    out: list[list[int]] = [[] for _ in range(k)]
    for cls in (True, False):
        idx = rng.permutation(np.nonzero(is_ft == cls)[0])
        for f in range(k):
            out[f] += list(idx[f::k])
    return [np.sort(np.asarray(f)) for f in out]


def grow(values: list, best, step, low=None) -> list:
    """The grid with one more value past `best` when `best` is on an edge (`step` maps a
    value and a direction, -1 or +1, to the next); unchanged when `best` is inside."""
    values = sorted(values)
    if best == values[-1]:
        return values + [step(best, +1)]
    if best == values[0]:
        nxt = step(best, -1)
        if low is None or nxt >= low:
            return [nxt] + values
    return values


def neighbours(values: list, v) -> list:
    """`v` and the values beside it in the sorted grid."""
    values = sorted(values)
    i = values.index(v)
    return values[max(0, i - 1):i + 2]


SPLITS = ("calib", "test")


def diverged(cells_at_lr: dict) -> bool:
    """True when the longest budget tried at a learning rate ended at a constant answer on
    every fold (AUC exactly 0.5): training longer at that rate is not tried (E1 at lr 0.81
    stayed constant from 512 to 1,024 epochs and on the first fold of 2,048)."""
    if not cells_at_lr:
        return False
    longest = max(cells_at_lr, key=lambda c: c[1])
    return all(a == 0.5 for a in cells_at_lr[longest]["fold_auc"])


def feature_key(workdir: str, data_dir: str, views: int, max_images: int | None) -> str:
    """What the cached features depend on: the workdir's config, backbone record and
    weights (a release's variables.msgpack), the images and the views."""
    h = hashlib.sha256(json.dumps([str(Path(data_dir).resolve()), views, max_images]).encode())
    for name in ("config.json", "backbone/result.json", "variables.msgpack"):
        f = Path(workdir) / name
        h.update(f.read_bytes() if f.exists() else b"-")
    return h.hexdigest()[:16]


def load_or_make(path: Path, make) -> dict:
    """The feature caches `make()` returns, saved to `path` (.npz) on the first run and read
    back on later ones: a resumed search skips the minutes of running the backbone."""
    if path.exists():
        out: dict = {}
        with np.load(path) as z:
            for key in z.files:
                split, field, i = key.split("|")
                c = out.setdefault(split, {"feats": [], "logits": [], "is_ft": []})
                if field == "views":
                    c["views"] = int(z[key])
                else:
                    c[field].append((int(i), z[key]))
        for c in out.values():
            for field in ("feats", "logits", "is_ft"):
                c[field] = [a for _, a in sorted(c[field], key=lambda t: t[0])]
        return out
    caches = make()
    flat = {f"{split}|{field}|{i}": a for split, c in caches.items()
            for field in ("feats", "logits", "is_ft") for i, a in enumerate(c[field])}
    flat.update({f"{split}|views|0": np.asarray(c["views"]) for split, c in caches.items()})
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(tmp, **flat)
    tmp.rename(path)   # whole or not at all: a second search may be reading the same file
    return caches


def choose(cells: dict) -> tuple[float, int]:
    """The (lr, epochs) with the best mean fold AUC."""
    return max(cells, key=lambda c: np.mean(cells[c]["fold_auc"]))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    ec.add_source_flags(p, EXPERTS)
    p.add_argument("--lrs", default="3e-3,1e-2,3e-2",
                   help="E1's starting lr grid (Adam peak; it grows past an edge that wins)")
    p.add_argument("--aux5b-lrs", default="1e-3,3e-3,1e-2", help="Aux+5b's starting lr grid")
    p.add_argument("--epochs", default="8,16,32", help="starting epochs grid")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--views", type=int, default=16, help="augmented views cached per image")
    p.add_argument("--seeds", type=int, default=5, help="seeds at the chosen setting")
    p.add_argument("--max-extensions", type=int, default=4,
                   help="grid steps added past an edge, per side and axis")
    p.add_argument("--max-images", type=int, default=None,
                   help="use only this many held-out images (a quick check)")
    p.add_argument("--probe", default=None,
                   help="LR:EPOCHS,...: cross-validate just these cells (added to the "
                        "expert's cells in --out), then stop: no search, no seeds")
    p.add_argument("--merge-from", default=None,
                   help="JSON,...: finished cells of the same experts from other runs' --out "
                        "(e.g. --probe runs in parallel processes) join --out's first")
    p.add_argument("--seeds-at", default=None,
                   help="LR:EPOCHS: train the final seeds (or --seed-list's) at this cell without "
                        "searching, ahead of the search's choice (another process's); a run "
                        "that merges them keeps them only if its search chooses this cell")
    p.add_argument("--seed-list", default=None,
                   help="N,...: train only these of the final seeds (each needs the search "
                        "finished in --out or --merge-from); another process takes the rest")
    p.add_argument("--out", required=True, help="JSON of every candidate, the choices and AUCs")
    p.add_argument("--feature-cache", default=None,
                   help="folder of the cached features (default: --out's); about 2 GB per "
                        "workdir, views and image count")
    p.add_argument("--scores-out", default=None,
                   help=".npz of every final seed's calibration and test scores")
    args = p.parse_args(argv)
    names = ec.chosen_experts(p, args.experts, EXPERTS)
    if args.folds < 2 or args.seeds < 1:
        p.error("--folds must be at least 2 and --seeds at least 1")
    grids = {"experts": [float(x) for x in args.lrs.split(",")],
             "aux5b": [float(x) for x in args.aux5b_lrs.split(",")]}
    epochs0 = [int(x) for x in args.epochs.split(",")]

    out_path = Path(args.out)
    result = json.loads(out_path.read_text()) if out_path.exists() else {}
    merged_scores: dict = {}   # final seeds' scores from --merge-from runs
    for other in (args.merge_from.split(",") if args.merge_from else []):
        # A cell is the same wherever it ran: its folds and seeds are fixed by (lr, epochs).
        their_result = json.loads(Path(other).read_text())
        their_scores = their_result.get("scores_out")
        their_scores = (dict(np.load(their_scores))
                        if their_scores and Path(their_scores).exists() else {})
        for name, theirs in their_result.get("experts", {}).items():
            mine = result.setdefault("experts", {}).setdefault(
                name, {k: theirs[k] for k in ("kind", "expert_inputs")} | {"cells": {}})
            for key, cell in theirs["cells"].items():
                mine["cells"].setdefault(key, cell)
                mine.get("partial", {}).pop(key, None)
            for seed, run in theirs.get("seed_runs", {}).items():
                mine.setdefault("seed_runs", {}).setdefault(seed, run)
                merged_scores.update({k: their_scores[k] for k in
                                      (f"{name}|{sp}|{seed}" for sp in SPLITS)
                                      if k in their_scores})
    if args.merge_from:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1))
    t0 = time.perf_counter()
    cfg, d, model, backbone, x_ft, y_ft = ec.load_source(args.workdir, args.data_dir)
    if args.max_images:
        x_ft, y_ft = x_ft[:args.max_images], y_ft[:args.max_images]

    def make() -> dict:
        out = {s: ec.cache_views(model, backbone, np.asarray(materialize(d[f"{s}_images"])),
                                 np.asarray(d[f"{s}_labels"])) for s in ("calib", "test")}
        out["val"] = ec.cache_views(model, backbone, x_ft, y_ft)
        out["train"] = ec.cache_views(model, backbone, x_ft, y_ft, views=args.views,
                                      pad=cfg.pad_crop, seed=cfg.seed + 2, dtype=np.float16)
        return out

    key = feature_key(args.workdir, args.data_dir, args.views, args.max_images)
    plain = load_or_make(Path(args.feature_cache or out_path.parent) / f"features-{key}.npz",
                         make)
    train = plain.pop("train")
    is_ft = plain["val"]["is_ft"][0]
    folds = folds_of(is_ft, args.folds, cfg.seed)
    print(f"features cached in {time.perf_counter() - t0:.0f} s: {len(y_ft)} held-out images "
          f"(FT {is_ft.mean():.2%}) x {args.views} views, {args.folds} folds; calibration "
          f"{len(plain['calib']['is_ft'][0])}, test {len(plain['test']['is_ft'][0])}", flush=True)
    result.update({"workdir": args.workdir, "heldout_images": len(y_ft),
                   "heldout_ft_rate": float(is_ft.mean()), "folds": args.folds,
                   "views": args.views, "seeds": args.seeds,
                   "batch_size": cfg.expert_batch_size,
                   "weight_decay": cfg.expert_weight_decay,
                   "max_softmax_O1": {s: ec.auc(ec.max_softmax(plain[s], 0), plain[s], 0)
                                      for s in ("calib", "test", "val")}})
    result.setdefault("experts", {})
    scores = {}
    if args.scores_out and Path(args.scores_out).exists():
        scores = {k: v for k, v in np.load(args.scores_out).items() if "|" in k}
    scores = merged_scores | scores
    if args.scores_out:
        result["scores_out"] = args.scores_out

    def save() -> None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1))
        if args.scores_out and scores:
            np.savez_compressed(args.scores_out, **scores,
                                calib_is_ft=plain["calib"]["is_ft"][0],
                                test_is_ft=plain["test"]["is_ft"][0])

    for name in names:
        kind, inputs = EXPERTS[name]
        m = model if inputs is None else build_model(dataclasses.replace(cfg, expert_inputs=inputs))
        r = result["experts"].setdefault(name, {"kind": kind, "expert_inputs": inputs,
                                                "cells": {}})
        cells = {tuple(json.loads(k)): v for k, v in r["cells"].items()}

        def fit(lr: float, epochs: int, seed: int, images=None):
            init = ec.init_expert(m, kind, 0, seed, train["feats"][0].shape)
            w = ec.class_weights(is_ft if images is None else is_ft[images])
            return ec.train_expert(m, train, kind, 0, lr, epochs, cfg.expert_batch_size, seed,
                                   cfg.expert_weight_decay, class_w=w, init=init, images=images)

        def evaluate(lr: float, epochs: int) -> None:
            if (lr, epochs) in cells:
                return
            # Folds are saved as they finish (under "partial"): a stop loses one fold at
            # most, not a whole cell (a cell of 2,048 epochs takes over half an hour).
            key, partial = json.dumps([lr, epochs]), r.setdefault("partial", {})
            done = partial.get(key, {"fold_auc": [], "seconds": 0.0})
            t, aucs = time.perf_counter(), list(done["fold_auc"])
            for f, held in enumerate(folds):
                if f < len(aucs):
                    continue
                rest = np.sort(np.concatenate([folds[g] for g in range(len(folds)) if g != f]))
                v = fit(lr, epochs, f, rest)
                s = ec.expert_scores(m, v, plain["val"], kind, 0)[held]
                aucs.append(roc_auc(s, ~is_ft[held]))
                partial[key] = {"fold_auc": aucs, "seconds": done["seconds"]
                                + time.perf_counter() - t}
                save()
            cells[(lr, epochs)] = partial.pop(key)
            r["cells"][key] = cells[(lr, epochs)]
            print(f"{name}: lr {lr:g}, {epochs} epochs: fold AUC "
                  f"{' '.join(f'{a:.4f}' for a in aucs)} (mean {np.mean(aucs):.4f}, "
                  f"{cells[(lr, epochs)]['seconds']:.0f} s)", flush=True)
            save()

        if args.probe:
            for cell in args.probe.split(","):
                lr, e = cell.split(":")
                evaluate(float(lr), int(e))
            continue

        def stuck(lr: float, epochs: int, judged: dict) -> bool:
            """True (and said) when `lr` is not tried at `epochs`: it is not done and the
            longest of the `judged` cells at that lr ended at a constant answer."""
            if (lr, epochs) in cells or not diverged(judged):
                return False
            print(f"{name}: lr {lr:g} not tried at {epochs} epochs: it gave a constant "
                  "answer at its longest budget", flush=True)
            return True

        def search() -> tuple[float, int]:
            """The grid search; returns the chosen (lr, epochs), recorded in `r`."""
            lrs, eps = sorted(grids[kind]), sorted(epochs0)
            for lr in lrs:  # the starting grid, in full
                for e in eps:
                    evaluate(lr, e)
            added = {"lr": [0, 0], "epochs": [0, 0]}
            while True:
                best_lr, best_ep = choose({c: cells[c] for c in cells if c[0] in lrs and c[1] in eps})
                grown = False
                for axis in ("lr", "epochs"):
                    values, best = (lrs, best_lr) if axis == "lr" else (eps, best_ep)
                    new = (grow(values, best, lambda x, s: x * 3.0 ** s) if axis == "lr" else
                           grow(values, best, lambda x, s: int(x * 2.0 ** s), low=1))
                    if len(new) == len(values):
                        continue
                    side = int(new[-1] != values[-1])  # 1: grew at the high end
                    if added[axis][side] >= args.max_extensions:
                        continue
                    added[axis][side] += 1
                    grown = True
                    value = new[-1] if side else new[0]
                    # The new value is tried beside the best of the other axis and its
                    # neighbours there, not across the whole grid.
                    if axis == "lr":
                        for e in neighbours(eps, best_ep):
                            if not stuck(value, e, {c: v for c, v in cells.items()
                                                    if c[0] == value and c[1] < e}):
                                evaluate(value, e)
                        lrs = new
                    else:
                        for lr in neighbours(lrs, best_lr):
                            if not stuck(lr, value, {c: v for c, v in cells.items()
                                                     if c[0] == lr}):
                                evaluate(lr, value)
                        eps = new
                if not grown:
                    break
            r["lr_grid"], r["epochs_grid"] = sorted(lrs), sorted(eps)
            r["chosen"] = {"lr": best_lr, "epochs": best_ep,
                           "fold_auc_mean": float(np.mean(cells[(best_lr, best_ep)]["fold_auc"])),
                           "on_edge": {"lr": best_lr in (min(lrs), max(lrs)),
                                       "epochs": best_ep in (min(eps), max(eps))}}
            print(f"{name}: chosen lr {best_lr:g}, {best_ep} epochs (edge: {r['chosen']['on_edge']})",
                  flush=True)
            return best_lr, best_ep

        if args.seeds_at:
            lr, e = args.seeds_at.split(":")
            best_lr, best_ep = float(lr), int(e)
        else:
            best_lr, best_ep = search()
        # The seeds at the chosen setting, each saved when it ends ("seed_runs", its scores
        # as "<name>|<split>|<seed>"): a rerun goes on from them, and processes given
        # --seed-list share the seeds out (--merge-from takes theirs in).
        runs = r.setdefault("seed_runs", {})
        if r.get("final") != [best_lr, best_ep]:
            for k in ("calib_auc", "test_auc"):
                r.pop(k, None)
        r["final"] = [best_lr, best_ep]
        for seed, run in list(runs.items()):
            if run["final"] != [best_lr, best_ep]:
                runs.pop(seed)
        save()  # the choice, even when every seed runs in other processes
        wanted = ([int(x) for x in args.seed_list.split(",")] if args.seed_list
                  else range(args.seeds))
        def seed_done(seed: int) -> bool:
            return str(seed) in runs and all(f"{name}|{sp}|{seed}" in scores for sp in SPLITS)

        for seed in wanted:
            if seed_done(seed):
                continue
            v = fit(best_lr, best_ep, seed)
            run = {"final": [best_lr, best_ep]}
            for sp in SPLITS:
                row = ec.expert_scores(m, v, plain[sp], kind, 0)
                scores[f"{name}|{sp}|{seed}"] = row
                run[f"{sp}_auc"] = ec.auc(row, plain[sp], 0)
            runs[str(seed)] = run
            print(f"{name}: seed {seed} at lr {best_lr:g}, {best_ep} epochs: test AUC "
                  f"{run['test_auc']:.4f}", flush=True)
            save()
        have = [s for s in range(args.seeds) if seed_done(s)]
        if len(have) < args.seeds:
            print(f"{name}: seeds {have} of {args.seeds} done", flush=True)
            continue
        for sp in SPLITS:
            r[f"{sp}_auc"] = [runs[str(s)][f"{sp}_auc"] for s in range(args.seeds)]
            scores[f"{name}|{sp}"] = np.stack([scores[f"{name}|{sp}|{s}"]
                                               for s in range(args.seeds)])
        save()
        t = np.asarray(r["test_auc"])
        sd = t.std(ddof=1) if len(t) > 1 else 0.0
        print(f"{name}: {args.seeds} seeds, test AUC {t.mean():.4f} +- {sd:.4f} "
              f"(O1 max softmax {result['max_softmax_O1']['test']:.4f})", flush=True)

    print("\n| expert | lr grid | epochs grid | chosen lr, epochs | CV AUC | "
          f"test AUC, mean +- std over {args.seeds} seeds |")
    print("|---|---|---|---|---:|---:|")
    for name, r in result["experts"].items():
        if "chosen" not in r or "test_auc" not in r:
            continue
        t = np.asarray(r["test_auc"])
        c = r["chosen"]
        print(f"| {name} | {min(r['lr_grid']):g} .. {max(r['lr_grid']):g} | "
              f"{min(r['epochs_grid'])} .. {max(r['epochs_grid'])} | {c['lr']:g}, {c['epochs']} | "
              f"{c['fold_auc_mean']:.4f} | {t.mean():.4f} +- "
              f"{t.std(ddof=1) if len(t) > 1 else 0.0:.4f} |")
    ms = result["max_softmax_O1"]
    print(f"| O1 max softmax (no training) | - | - | - | {ms['val']:.4f} (held-out) | "
          f"{ms['test']:.4f} |")
    return result


if __name__ == "__main__":
    main()
