"""CPU seconds per test (the pytest process's own plus the subprocesses it waited for), for
finding where the suite's time goes under pytest-xdist, where wall-clock durations depend
on what the other worker runs beside. A pytest plugin, and a comparison of two runs:

    CNNEB_SUITE_CPU=runs/suite-cpu/a PYTHONPATH=experiments \\
        .venv/bin/python -m pytest -p suite_cpu
    python experiments/suite_cpu.py runs/suite-cpu/a runs/suite-cpu/b

CPU seconds hold up better than wall time when something else shares the cores, but not
perfectly (caches, frequency): compare runs made under the same conditions.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import pytest


def _cpu() -> tuple[float, float]:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Setup, call and teardown of one test (so a session fixture counts where first used)."""
    own, kids, t = *_cpu(), time.time()
    yield
    own2, kids2 = _cpu()
    folder = Path(os.environ.get("CNNEB_SUITE_CPU", "runs/suite-cpu/latest"))
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{os.getpid()}.jsonl", "a") as f:
        f.write(json.dumps({"id": item.nodeid, "own": own2 - own, "children": kids2 - kids,
                            "wall": time.time() - t}) + "\n")


def read(folder: str) -> dict[str, float]:
    rows = [json.loads(line) for p in Path(folder).glob("*.jsonl")
            for line in p.read_text().splitlines()]
    return {r["id"]: r["own"] + r["children"] for r in rows}


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit(__doc__)
    a, b = read(argv[0]), read(argv[1])
    print(f"# {len(a)} tests, {sum(a.values()):.0f} CPU-s in {argv[0]}; "
          f"{len(b)} tests, {sum(b.values()):.0f} CPU-s in {argv[1]}")
    print("| CPU-s before | after | change | test |\n|---:|---:|---:|---|")
    rows = sorted(set(a) | set(b), key=lambda k: -max(a.get(k, 0), b.get(k, 0)))
    for k in rows[:25]:
        print(f"| {a.get(k, 0):.1f} | {b.get(k, 0):.1f} | "
              f"{b.get(k, 0) - a.get(k, 0):+.1f} | `{k}` |")


if __name__ == "__main__":
    main(sys.argv[1:])
