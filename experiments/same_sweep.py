"""Do two sweeps agree on everything but time? Accuracies, every grid point, Table 2's
operating points (thresholds, accuracies, FLOPs, exit shares, within-target shares) and
FLOPs, compared field by field with every timing field left out (issue 32: the shipped
model's sweep before and after the restructuring).

    git worktree add /tmp/before e885ef4
    (cd /tmp/before && python evaluate.py --sweep --workdir pretrained/cifar --out /tmp/a \
        --data-dir ../shared/datasets/cifar10-jpeg --repeats 1 --timing-images 200 \
        --single-images 5)
    python evaluate.py --sweep ... --out /tmp/b    # the same flags, on this checkout
    python experiments/same_sweep.py /tmp/a/sweep.json /tmp/b/sweep.json
"""
import json,sys
a=json.load(open(sys.argv[1])); b=json.load(open(sys.argv[2]))
TIME=("ms_","time_","routing_overhead","single_saving","ref_ms","ref_single")
def strip(x):
    if isinstance(x,dict): return {k:strip(v) for k,v in x.items() if not k.startswith(TIME)}
    if isinstance(x,list): return [strip(v) for v in x]
    return x
keys=["exits_accuracy","table2","points","flops","calibration_exit_gap"]
for k in keys:
    same = strip(a[k])==strip(b[k])
    print(k, "identical" if same else "DIFFERENT")
for k in a["baselines"]:
    print("baseline",k, {kk:a["baselines"][k][kk]==b["baselines"][k][kk] for kk in ("accuracy","flops")})
print("table2 rows", len(a["table2"]), "points", len(a["points"]))
for r in b["table2"]:
    print(r["rule"], r["target_drop"], round(r["threshold"],6), round(r["accuracy"],4), round(r["flops_saving"],4))
