"""XLA FLOPs per image of each CNN-EB segment, and the branch-point prefix's share.

    python bench/flops.py --config cifar
"""

from __future__ import annotations

import benchlib
from cnneb_jax.metrics import prefix_share, segment_flops
from cnneb_jax.model import abstract_variables, build_model, count_params


def main(argv: list[str] | None = None) -> None:
    p = benchlib.parser(__doc__)
    benchlib.config_flags(p)
    args = p.parse_args(argv)
    cfg = benchlib.config(args.config, args.set)
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
