"""docs/check_results.py: every checked number on the results page matches the committed
output it names, and a wrong, unsourced or unreadable number fails."""

import importlib.util
import json
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
spec = importlib.util.spec_from_file_location("check_results", DOCS / "check_results.py")
check_results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_results)


def test_results_page_matches_its_committed_outputs():
    assert check_results.check(DOCS / "RESULTS.md") == []


def test_history_page_matches_its_committed_outputs():
    assert check_results.check(DOCS / "experiments.md") == []


@pytest.fixture
def docs(tmp_path, monkeypatch):
    """A docs folder of its own: write outputs into it, then check pages with `_problems`."""
    monkeypatch.setattr(check_results, "DOCS", tmp_path)
    return tmp_path


def _problems(docs: Path, page_text: str) -> list[str]:
    page = docs / "page.md"
    page.write_text(page_text)
    return check_results.check(page)


def test_a_wrong_or_unsourced_number_fails(docs):
    (docs / "out.json").write_text(json.dumps({"acc": {"O1": 0.8274, "O2": 0.87012},
                                               "rows": [{"d": 0.012}]}))
    (docs / "t.csv").write_text("rule,saving\nexpert,0.243\nmax_softmax,0.633\n")
    good = ("O2 **87.01%**<!-- check: out.json#acc.O2 .2% --> and a drop of +1.2 pt"
            "<!-- check: out.json#rows.0.d +.1fpt -->; max softmax saves 63.3%"
            "<!-- check: t.csv#rule=max_softmax.saving .1% -->; a gap of +4.3 pt"
            "<!-- check: out.json#acc.O2--O1 +.1fpt -->\n")
    assert _problems(docs, good) == []
    [problem] = _problems(docs, good.replace("87.01%", "87.10%"))
    assert "line 1" in problem and "87.10%" in problem and "87.01%" in problem
    assert "KeyError" in _problems(docs, "O2 87.01%<!-- check: out.json#acc.O3 .2% -->\n")[0]
    assert "FileNotFoundError" in _problems(
        docs, "O2 87.01%<!-- check: missing.json#acc.O2 .2% -->\n")[0]
    assert "no checked numbers" in _problems(docs, "no checks here: 87.01%\n")[0]


def test_a_text_output_is_read_by_line(docs):
    (docs / "bench.txt").write_text("round 1: 3 ms\n| forward, batch 8 | 547 (544-595) | 1,883 |\n"
                                    "306 passed in 506.81s (0:08:26)\n")
    assert _problems(docs, "547 ms<!-- check: bench.txt#~forward,_batch_8.1 ,.0f --> and its "
                     "worst 595<!-- check: bench.txt#~forward,_batch_8.3 .0f -->, Keras 1,883 ms"
                     "<!-- check: bench.txt#~forward,_batch_8.4 ,.0f -->; 306 tests"
                     "<!-- check: bench.txt#~passed_in.0 .0f -->, a range of 51"
                     "<!-- check: bench.txt#~forward,_batch_8.3--~forward,_batch_8.2 .0f -->\n"
                     ) == []
    (docs / "two.txt").write_text("| 1 | 5 |\n| 1 | 7 |\n")
    assert _problems(docs, "first 5<!-- check: two.txt#~|_1_|.1 .0f -->, last 7"
                     "<!-- check: two.txt#~~|_1_|.1 .0f -->\n") == []
    assert "548" in _problems(docs, "548 ms<!-- check: bench.txt#~forward,_batch_8.1 ,.0f -->\n")[0]
    assert "no line contains 'backward'" in _problems(
        docs, "1 s<!-- check: bench.txt#~backward.0 .0f -->\n")[0]


def test_means_minutes_and_encoded_keys(docs):
    (docs / "o.json").write_text(json.dumps(
        {"E1 (softmax)": {"[0.03, 64]": {"auc": [0.6, 0.7, 0.8]}}, "train_seconds": 2861.4}))
    assert _problems(docs, "AUC 0.700<!-- check: o.json#E1%20(softmax).[0%2E03,%2064].auc.mean "
                     ".3f --> in 47.7 minutes<!-- check: o.json#train_seconds .1fmin -->\n") == []
    assert "'47.7'" in _problems(
        docs, "47.6 minutes<!-- check: o.json#train_seconds .1fmin -->\n")[0]
    assert _problems(docs, "+- 0.100<!-- check: o.json#E1%20(softmax).[0%2E03,%2064].auc.std "
                     ".3f -->\n") == []
    assert "'0.100'" in _problems(docs, "+- 0.082<!-- check: o.json#E1%20(softmax)."
                                  "[0%2E03,%2064].auc.std .3f -->\n")[0]
