"""XLA FLOPs per image of each CNN-EB segment, and the branch-point prefix's share.

    python bench/flops.py --config cifar
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from cnneb_jax.configs import CONFIGS, get_config  # noqa: E402
from cnneb_jax.metrics import prefix_share, segment_flops  # noqa: E402
from cnneb_jax.model import abstract_variables, build_model, count_params  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="cifar", choices=sorted(CONFIGS))
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field, as train.py --set")
    args = p.parse_args()
    cfg = get_config(args.config, dict(kv.split("=", 1) for kv in args.set))
    cfg = cfg.replace(num_classes=cfg.num_classes or 10)  # CIFAR-10 unless set
    model = build_model(cfg)
    # Shapes are all the cost analysis needs (no eager initialisation).
    v = abstract_variables(model)
    flops = segment_flops(model, v)
    print("| part | MFLOPs / image | parameters |\n|---|---:|---:|")
    for key, f in flops.items():
        group, name = key.split(":")
        group = {"seg": "segments", "head": "heads", "expert": "experts", "aux5b": "aux5b"}[group]
        print(f"| {key} | {f / 1e6:.2f} | {count_params(v[group][name]['params']):,} |")
    seg_total = sum(f for k, f in flops.items() if k.startswith("seg:"))
    last_head = [k for k in flops if k.startswith("head:")][-1]
    first_seg = [k for k in flops if k.startswith("seg:")][0]
    print(f"\nO1 only (first segment + O1): {(flops[first_seg] + flops['head:O1']) / 1e6:.2f} MFLOPs")
    print(f"{last_head[5:]} only (all segments + {last_head[5:]}): "
          f"{(seg_total + flops[last_head]) / 1e6:.2f} MFLOPs")
    print(f"\nprefix (first segment + O1 + E1) share of the full network with E1: "
          f"{prefix_share(flops):.1%}")


if __name__ == "__main__":
    main()
