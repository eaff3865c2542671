"""Page faults and kernel time of our train step, with glibc as it is or with freed memory
kept for reuse (cnneb_jax/host_memory.py). Each setting runs in a fresh process (the
setting must come before NumPy and JAX start threads), in interleaved rounds; each process
times `--steps` steps after two warm-up calls.

    python experiments/step_faults.py --rounds 3 --tasks train:8 cifar_train32:128

With many `--steps`, the resident memory at the end says what keeping freed memory costs
(its timings then ran beside other work, if any).

What it showed (docs/experiments.md §23): XLA:CPU allocates each call's temporary buffer
afresh, glibc maps it with mmap and unmaps it after, so every page of it faults again on
every call (`strace -f -e trace=mmap,munmap -p PID` on a running step shows the pair).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(task: str, batch: int, steps: int, keep: bool) -> dict:
    if keep:
        from cnneb_jax.host_memory import keep_freed_memory
        if not keep_freed_memory():
            raise SystemExit("keep_freed_memory did not apply")
    import resource
    import time
    sys.path.insert(0, str(HERE.parent / "bench"))
    import peer
    config = "cifar" if task.startswith("cifar") else "full"
    call, _ = peer.jax_call(task, "float32", batch, config)
    call()
    call()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        call()
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    per = lambda a, b: (b - a) / steps
    resident = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"wall_ms": per(t0, t1) * 1e3,
            "user_ms": per(r0.ru_utime, r1.ru_utime) * 1e3,
            "sys_ms": per(r0.ru_stime, r1.ru_stime) * 1e3,
            "faults": per(r0.ru_minflt, r1.ru_minflt),
            "resident_mb": resident / 2**20, "peak_mb": r1.ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--tasks", nargs="+", default=["train:8", "cifar_train32:128"],
                   help="TASK:BATCH, TASK train (the full config) or cifar_train32")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print("RESULT " + json.dumps(worker(**spec)), flush=True)
        return
    rows = {}
    for r in range(args.rounds):
        order = [(t, keep) for t in args.tasks for keep in (False, True)]
        for task, keep in (order if r % 2 == 0 else order[::-1]):
            name, batch = task.split(":")
            spec = {"task": name, "batch": int(batch), "steps": args.steps, "keep": keep}
            env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
            out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                                 capture_output=True, text=True, env=env)
            got = [json.loads(ln[7:]) for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if not got:
                print(f"failed: {spec}\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.setdefault((task, keep), []).append(got[0])
            print(f"round {r}: {task} {'kept' if keep else 'glibc as is'}: {got[0]}", flush=True)
    print("\n| step, float32 | freed memory | wall ms | user ms | sys ms | page faults | "
          "MB faulted | resident MB at the end | peak MB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for (task, keep), runs in rows.items():
        med = {k: sorted(x[k] for x in runs)[len(runs) // 2] for k in runs[0]}
        print(f"| {task} | {'kept' if keep else 'glibc as is'} | {med['wall_ms']:.0f} | "
              f"{med['user_ms']:.0f} | {med['sys_ms']:.0f} | {med['faults']:,.0f} | "
              f"{med['faults'] * 4096 / 2**20:,.0f} | {med['resident_mb']:,.0f} | "
              f"{med['peak_mb']:,.0f} |")


if __name__ == "__main__":
    main()
