"""Recomputes every checked number on the results page from the committed outputs.

    python docs/check_results.py [docs/RESULTS.md]

A number on the page is checked when an HTML comment (invisible once rendered) follows it:

    O2 reaches **87.01%**<!-- check: results/cifar-test.json#test_accuracy.O2 .2% -->

The comment names a file under `docs/` (JSON, or CSV), a path into it and a Python format
spec. The path's steps are keys, list indices or `column=value` (the one record of a list
or CSV with that value); two paths joined by `--` give a difference, the second replacing
as many of the first's last steps as it has (`test.O2--test.O1`). A spec ending in `pt`
shows a fraction in points (`+.1fpt` writes 0.012 as "+1.2 pt"). The script compares the
formatted value with the last number written before the comment (after any earlier check
on the line; a number written without its unit is compared without it). A mismatch, a
missing file or key, or a page with no checks fails, naming the line.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
CHECK = re.compile(r"<!--\s*check:\s*(?P<file>[^#\s]+)#(?P<path>\S+)\s+(?P<spec>\S+)\s*-->")
NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?\s?(?:%|pt)?|[-+]?\.\d+")


def lookup(data, path: str):
    """`a.b.0.c` into nested dicts and lists; a CSV's first step may be `key=value`."""
    for step in path.split("."):
        if isinstance(data, list) and "=" in step:
            key, value = step.split("=", 1)
            rows = [r for r in data if str(r.get(key)) == value]
            if len(rows) != 1:
                raise KeyError(f"{len(rows)} rows with {key}={value}")
            data = rows[0]
        elif isinstance(data, list):
            data = data[int(step)]
        else:
            if step not in data:
                raise KeyError(f"no key {step!r} (has {sorted(data)[:8]})")
            data = data[step]
    return data


def render(value, spec: str) -> str:
    """`value` in a format spec (`.2%`, `.3f`, `,d`); `...pt` shows a fraction in points."""
    if spec.endswith("pt"):
        return format(100 * float(value), spec[:-2]) + " pt"
    return format(value if isinstance(value, int) else float(value), spec)


def load(file: str, cache: dict):
    if file not in cache:
        path = DOCS / file
        if path.suffix == ".csv":
            with open(path, newline="") as f:
                cache[file] = list(csv.DictReader(f))
        else:
            cache[file] = json.loads(path.read_text())
    return cache[file]


def check(page: Path) -> list[str]:
    """Every mismatch on `page`, as 'line N: ...'; empty when all checked numbers agree."""
    problems, cache, checked = [], {}, 0
    for n, line in enumerate(page.read_text().splitlines(), 1):
        start = 0
        for m in CHECK.finditer(line):
            checked += 1
            written = NUMBER.findall(re.sub(r"<!--.*?-->", "", line[start:m.start()]))
            start = m.end()
            where = f"line {n}: {m.group('file')}#{m.group('path')}"
            if not written:
                problems.append(f"{where}: no number before the check")
                continue
            try:
                data = load(m.group("file"), cache)
                # `x.a.b--a.c`: the difference of two values; the second path replaces
                # as many of the first's last steps as it has (x.a.b - x.a.c)
                first, *rest = m.group("path").split("--")
                value = lookup(data, first)
                for other in rest:
                    steps = first.split(".")
                    tail = other.split(".")
                    value = value - lookup(data, ".".join(steps[:len(steps) - len(tail)] + tail))
                expected = render(value, m.group("spec"))
            except (OSError, KeyError, IndexError, ValueError, TypeError) as e:
                problems.append(f"{where}: {type(e).__name__}: {e}")
                continue
            got, want = written[-1].replace(" ", ""), expected.replace(" ", "")
            if not got.endswith(("%", "pt")):  # "+4.00 ± 1.69 pt": the unit comes later
                want = want.removesuffix("pt")
            if got != want:
                problems.append(f"{where}: the page says {written[-1]!r}, the output gives "
                                f"{expected!r}")
    if not checked:
        problems.append(f"{page}: no checked numbers")
    return problems


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    page = Path(argv[0]) if argv else DOCS / "RESULTS.md"
    problems = check(page)
    for p in problems:
        print(p, file=sys.stderr)
    total = sum(len(CHECK.findall(line)) for line in page.read_text().splitlines())
    print(f"{page}: {total} checked numbers, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
