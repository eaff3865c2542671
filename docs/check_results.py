"""Recomputes every checked number on the results page from the committed outputs.

    python docs/check_results.py [docs/RESULTS.md]

A number on the page is checked when an HTML comment (invisible once rendered) follows it:

    O2 reaches **87.01%**<!-- check: results/cifar-test.json#test_accuracy.O2 .2% -->

The comment names a file under `docs/` (JSON, or CSV), a path into it and a Python format
spec. The path's steps are keys, list indices or `column=value` (the one record of a list
or CSV with that value); two paths joined by `--` give a difference, the second replacing
as many of the first's last steps as it has (`test.O2--test.O1`). A spec ending in `pt`
shows a fraction in points (`+.1fpt` writes 0.012 as "+1.2 pt"), one ending in `min`
seconds in minutes. The script compares the
formatted value with the last number written before the comment (after any earlier check
on the line; a number written without its unit is compared without it). A mismatch, a
missing file or key, or a page with no checks fails, naming the line.

A text output (any other suffix: a benchmark's printed table, a test run's log) is read by
line: the step `~words_of_the_line` takes the first line containing those words (`_` for a
space), and an index then picks one of the numbers on it (`peer.txt#~forward,_batch_8.1`:
the second number on the first line that contains "forward, batch 8"; `~~words` takes the
last such line instead; ranges like 544-595
read as two numbers; a number inside a word, like the 1 of "O1", is not one). A step
`mean` averages a list, `std` gives its sample standard deviation, and a step may be percent-encoded (`E1%20(softmax)`, `%2E` for a
dot inside a key).
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path
from urllib.parse import unquote

DOCS = Path(__file__).resolve().parent
CHECK = re.compile(r"<!--\s*check:\s*(?P<file>[^#\s]+)#(?P<path>\S+)\s+(?P<spec>\S+)\s*-->")
LINE_NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?")  # not the 1 of "O1"
NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?\s?(?:%|pt)?|[-+]?\.\d+")


def lookup(data, path: str):
    """`a.b.0.c` into nested dicts and lists; a CSV's first step may be `key=value`, a text
    file's `~words` (the numbers on the first line containing them)."""
    for step in map(unquote, _steps(path)):
        if isinstance(data, list) and step == "mean":
            data = sum(data) / len(data)
        elif isinstance(data, list) and step == "std":  # the sample standard deviation
            mean = sum(data) / len(data)
            data = (sum((x - mean) ** 2 for x in data) / (len(data) - 1)) ** 0.5
        elif isinstance(data, str) and step.startswith("~"):
            last = step.startswith("~~")
            words = step.lstrip("~").replace("_", " ")
            lines = data.splitlines()
            line = next((ln for ln in (lines[::-1] if last else lines) if words in ln), None)
            if line is None:
                raise KeyError(f"no line contains {words!r}")
            data = [float(x.replace(",", "")) for x in LINE_NUMBER.findall(line)]
        elif isinstance(data, list) and "=" in step:
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


def _steps(path: str) -> list[str]:
    """Dot-separated steps; a `~words` step may hold dots and ends at the next `.N` index."""
    if "~" not in path:
        return path.split(".")
    head, _, rest = path.partition("~")
    words, _, tail = re.match(r"(.*?)(\.(\d+(?:\..*)?))?$", rest).group(1, 2, 3)
    return ([*head.rstrip(".").split(".")] if head.strip(".") else []) + ["~" + words] + (
        tail.split(".") if tail else [])


def render(value, spec: str) -> str:
    """`value` in a format spec (`.2%`, `.3f`, `,d`); `...pt` shows a fraction in points."""
    if spec.endswith("pt"):
        return format(100 * float(value), spec[:-2]) + " pt"
    if spec.endswith("min"):  # seconds shown as minutes
        return format(float(value) / 60, spec[:-3])
    return format(value if isinstance(value, int) else float(value), spec)


def load(file: str, cache: dict):
    if file not in cache:
        path = DOCS / file
        if path.suffix == ".csv":
            with open(path, newline="") as f:
                cache[file] = list(csv.DictReader(f))
        elif path.suffix == ".json":
            cache[file] = json.loads(path.read_text())
        else:
            cache[file] = path.read_text()
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
                    steps = _steps(first)
                    tail = _steps(other)
                    # a second path as long as the first, or longer, stands alone
                    keep = steps[:max(0, len(steps) - len(tail))]
                    value = value - lookup(data, ".".join(keep + tail))
                expected = render(value, m.group("spec"))
            except (OSError, KeyError, IndexError, ValueError, TypeError) as e:
                problems.append(f"{where}: {type(e).__name__}: {e}")
                continue
            got, want = written[-1].replace(" ", ""), expected.replace(" ", "")
            if not got.endswith(("%", "pt")):  # "+4.00 ± 1.69 pt": the unit comes later
                want = want.removesuffix("pt")
            if not want.endswith(("%", "pt")):  # a bare number read from a text output
                got = got.removesuffix("%").removesuffix("pt")
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
