"""Every expert's AUC over seeds, each at a learning rate chosen on the calibration split
(issue 11, items 1-3).

    python experiments/expert_seeds.py --workdir pretrained/cifar --data-dir ../shared/datasets/cifar10-jpeg \
        --out docs/expert_seeds.json --scores-out runs/expert_seeds_scores.npz

The backbone of the workdir is frozen, so the branch-point features of the expert stage's
training data (one augmented view of each held-out FT image per epoch, as the stage draws
them) and of the calibration and test images are computed once (`expert_cache`). Each
expert is then trained from them as the stage trains it, many times:

1. for every learning rate in --lrs, --select-seeds seeds; the lr with the best mean ROC AUC
   on the calibration split (which no expert trains on) is chosen;
2. at that lr, --seeds seeds (the selection seeds included); their test AUC is reported as
   mean +- standard deviation, next to O1's max softmax (deterministic).

Experts: E1 as in the paper (O1-like layers + O1's softmax), E1 with the extra confidence
inputs (logits, max probability, margin, entropy: an ablation), E1 as in the paper with its
O1-like layers starting from O1's trained ones, and the Auxiliary+5b expert from random
weights and warm-started from the backbone's Mixed_5c.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import expert_cache as ec  # noqa: E402  (beside this script)
from cnneb_jax.model import build_model  # noqa: E402
from cnneb_jax.pipeline import materialize  # noqa: E402

# name -> (model kind, expert_inputs, warm start of the Aux+5b block)
EXPERTS = {
    "E1 (paper)": ("experts", "paper", False),
    "E1 (paper+confidence)": ("experts", "paper+confidence", False),
    "E1 (paper) from O1": ("experts", "paper", True),
    "Aux+5b": ("aux5b", None, False),
    "Aux+5b (from Mixed_5c)": ("aux5b", None, True),
}


def mean_std(x) -> tuple[float, float]:
    x = np.asarray(x, np.float64)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    ec.add_source_flags(p, EXPERTS)
    p.add_argument("--lrs", default="1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,1e-1",
                   help="Adam peak learning rates tried for every expert")
    p.add_argument("--aux5b-lrs", default="1e-4,3e-4,1e-3,3e-3,1e-2",
                   help="the same for the Auxiliary+5b experts (the expert stage's Aux+5b "
                        "collapses to a constant at 0.1)")
    p.add_argument("--select-seeds", type=int, default=2, help="seeds per lr for the choice")
    p.add_argument("--seeds", type=int, default=5, help="seeds at the chosen lr (>= select)")
    p.add_argument("--epochs", type=int, default=None, help="default: the config's expert_epochs")
    p.add_argument("--ft-images", type=int, default=None,
                   help="train the experts on a random subset of this many of the held-out "
                        "FT-label images (how many the held-out split needs)")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--scores-out", default=None,
                   help="write every final seed's calibration and test scores here (.npz)")
    args = p.parse_args()
    names = ec.chosen_experts(p, args.experts, EXPERTS)
    grids = {"experts": [float(x) for x in args.lrs.split(",")],
             "aux5b": [float(x) for x in args.aux5b_lrs.split(",")]}
    if args.seeds < args.select_seeds:
        p.error("--seeds must be at least --select-seeds")

    def save(result: dict, scores: dict, plain: dict) -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
        if args.scores_out:
            Path(args.scores_out).parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(args.scores_out, **scores,
                                calib_is_ft=plain["calib"]["is_ft"][0],
                                test_is_ft=plain["test"]["is_ft"][0])

    t0 = time.perf_counter()
    cfg, d, model, backbone, x_ft, y_ft = ec.load_source(args.workdir, args.data_dir)
    epochs = args.epochs or cfg.expert_epochs
    if args.ft_images:
        if not 0 < args.ft_images <= len(y_ft):
            p.error(f"--ft-images must be in 1..{len(y_ft)}")
        keep = np.sort(np.random.default_rng(0).permutation(len(y_ft))[:args.ft_images])
        x_ft, y_ft = x_ft[keep], y_ft[keep]
    train = ec.cache_views(model, backbone, x_ft, y_ft, views=epochs, pad=cfg.pad_crop,
                           seed=cfg.seed + 2, dtype=np.float16)
    plain = {s: ec.cache_views(model, backbone, np.asarray(materialize(d[f"{s}_images"])),
                               np.asarray(d[f"{s}_labels"])) for s in ("calib", "test")}
    plain["val"] = ec.cache_views(model, backbone, x_ft, y_ft)
    class_w = ec.class_weights(plain["val"]["is_ft"][0])
    print(f"features cached in {time.perf_counter() - t0:.0f} s: {len(y_ft)} FT-label images x "
          f"{epochs} views (FT rate {train['is_ft'][0].mean():.2%}), "
          f"{len(plain['calib']['is_ft'][0])} calibration, {len(plain['test']['is_ft'][0])} test "
          f"(FT rate {plain['test']['is_ft'][0].mean():.2%})", flush=True)

    result = {"workdir": args.workdir, "ft_images": len(y_ft), "epochs": epochs, "batch_size": cfg.expert_batch_size,
              "weight_decay": cfg.expert_weight_decay,
              "select_seeds": args.select_seeds, "seeds": args.seeds, "experts": {},
              "max_softmax_O1": {s: ec.auc(ec.max_softmax(plain[s], 0), plain[s], 0)
                                 for s in ("calib", "test")}}
    scores = {}
    for name in names:
        kind, inputs, warm = EXPERTS[name]
        lrs = grids[kind]
        m = model if inputs is None else build_model(dataclasses.replace(cfg, expert_inputs=inputs))

        def run(lr: float, seed: int) -> dict:
            init = ec.init_expert(m, kind, 0, seed, train["feats"][0].shape,
                                  backbone=backbone if warm else None)
            t = time.perf_counter()
            v = ec.train_expert(m, train, kind, 0, lr, epochs, cfg.expert_batch_size, seed,
                                cfg.expert_weight_decay, class_w=class_w, init=init)
            s = {sp: ec.expert_scores(m, v, plain[sp], kind, 0) for sp in ("calib", "test")}
            return {"seconds": time.perf_counter() - t, "scores": s,
                    **{sp: ec.auc(s[sp], plain[sp], 0) for sp in ("calib", "test")}}

        grid = {}
        for lr in lrs:
            runs = [run(lr, seed) for seed in range(args.select_seeds)]
            grid[lr] = runs
            print(f"{name}: lr {lr:g}: calibration AUC "
                  f"{' '.join(format(r['calib'], '.4f') for r in runs)} "
                  f"({runs[0]['seconds']:.0f} s per run)", flush=True)
        best = max(lrs, key=lambda lr: np.mean([r["calib"] for r in grid[lr]]))
        final = grid[best] + [run(best, seed) for seed in range(args.select_seeds, args.seeds)]
        cal, test = mean_std([r["calib"] for r in final]), mean_std([r["test"] for r in final])
        result["experts"][name] = {
            "kind": kind, "expert_inputs": inputs, "warm_start": warm, "chosen_lr": best,
            "calib_auc_by_lr": {f"{lr:g}": [r["calib"] for r in grid[lr]] for lr in lrs},
            "calib_auc": [r["calib"] for r in final], "test_auc": [r["test"] for r in final],
            "calib_auc_mean_std": cal, "test_auc_mean_std": test}
        for sp in ("calib", "test"):
            scores[f"{name}|{sp}"] = np.stack([r["scores"][sp] for r in final])
        print(f"{name}: chosen lr {best:g}; {args.seeds} seeds: calibration AUC {cal[0]:.4f} +- "
              f"{cal[1]:.4f}, test AUC {test[0]:.4f} +- {test[1]:.4f}", flush=True)
        save(result, scores, plain)  # after every expert: a stopped run keeps what it has

    ms = result["max_softmax_O1"]
    print(f"\n| expert | lr (chosen on calibration) | calibration AUC | test AUC, mean +- std "
          f"over {args.seeds} seeds |")
    print("|---|---:|---:|---:|")
    for name, r in result["experts"].items():
        (cm, cs), (tm, ts) = r["calib_auc_mean_std"], r["test_auc_mean_std"]
        print(f"| {name} | {r['chosen_lr']:g} | {cm:.4f} +- {cs:.4f} | {tm:.4f} +- {ts:.4f} |")
    print(f"| O1 max softmax (no training) | - | {ms['calib']:.4f} | {ms['test']:.4f} |")


if __name__ == "__main__":
    main()
