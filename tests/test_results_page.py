"""docs/check_results.py: every checked number on the results page matches the committed
output it names, and a wrong, unsourced or unreadable number fails."""

import importlib.util
import json
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
spec = importlib.util.spec_from_file_location("check_results", DOCS / "check_results.py")
check_results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_results)


def test_results_page_matches_its_committed_outputs():
    assert check_results.check(DOCS / "RESULTS.md") == []


def test_history_page_matches_its_committed_outputs():
    assert check_results.check(DOCS / "experiments.md") == []


def test_a_wrong_or_unsourced_number_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(check_results, "DOCS", tmp_path)
    (tmp_path / "out.json").write_text(json.dumps({"acc": {"O1": 0.8274, "O2": 0.87012},
                                                   "rows": [{"d": 0.012}]}))
    (tmp_path / "t.csv").write_text("rule,saving\nexpert,0.243\nmax_softmax,0.633\n")
    page = tmp_path / "page.md"
    good = ("O2 **87.01%**<!-- check: out.json#acc.O2 .2% --> and a drop of +1.2 pt"
            "<!-- check: out.json#rows.0.d +.1fpt -->; max softmax saves 63.3%"
            "<!-- check: t.csv#rule=max_softmax.saving .1% -->; a gap of +4.3 pt"
            "<!-- check: out.json#acc.O2--O1 +.1fpt -->\n")
    page.write_text(good)
    assert check_results.check(page) == []
    page.write_text(good.replace("87.01%", "87.10%"))
    [problem] = check_results.check(page)
    assert "line 1" in problem and "87.10%" in problem and "87.01%" in problem
    page.write_text("O2 87.01%<!-- check: out.json#acc.O3 .2% -->\n")
    assert "KeyError" in check_results.check(page)[0]
    page.write_text("O2 87.01%<!-- check: missing.json#acc.O2 .2% -->\n")
    assert "FileNotFoundError" in check_results.check(page)[0]
    page.write_text("no checks here: 87.01%\n")
    assert "no checked numbers" in check_results.check(page)[0]


def test_a_text_output_is_read_by_line(tmp_path, monkeypatch):
    monkeypatch.setattr(check_results, "DOCS", tmp_path)
    (tmp_path / "bench.txt").write_text("round 1: 3 ms\n| forward, batch 8 | 547 (544-595) | 1,883 |\n"
                                        "306 passed in 506.81s (0:08:26)\n")
    page = tmp_path / "page.md"
    page.write_text("547 ms<!-- check: bench.txt#~forward,_batch_8.1 ,.0f --> and its worst 595"
                    "<!-- check: bench.txt#~forward,_batch_8.3 .0f -->, Keras 1,883 ms"
                    "<!-- check: bench.txt#~forward,_batch_8.4 ,.0f -->; 306 tests"
                    "<!-- check: bench.txt#~passed_in.0 .0f -->, a range of 51"
                    "<!-- check: bench.txt#~forward,_batch_8.3--~forward,_batch_8.2 .0f -->\n")
    assert check_results.check(page) == []
    (tmp_path / "two.txt").write_text("| 1 | 5 |\n| 1 | 7 |\n")
    page.write_text("first 5<!-- check: two.txt#~|_1_|.1 .0f -->, last 7"
                    "<!-- check: two.txt#~~|_1_|.1 .0f -->\n")
    assert check_results.check(page) == []
    page.write_text("548 ms<!-- check: bench.txt#~forward,_batch_8.1 ,.0f -->\n")
    assert "548" in check_results.check(page)[0]
    page.write_text("1 s<!-- check: bench.txt#~backward.0 .0f -->\n")
    assert "no line contains 'backward'" in check_results.check(page)[0]


def test_means_minutes_and_encoded_keys(tmp_path, monkeypatch):
    monkeypatch.setattr(check_results, "DOCS", tmp_path)
    (tmp_path / "o.json").write_text(json.dumps(
        {"E1 (softmax)": {"[0.03, 64]": {"auc": [0.6, 0.7, 0.8]}}, "train_seconds": 2861.4}))
    page = tmp_path / "page.md"
    page.write_text("AUC 0.700<!-- check: o.json#E1%20(softmax).[0%2E03,%2064].auc.mean .3f -->"
                    " in 47.7 minutes<!-- check: o.json#train_seconds .1fmin -->\n")
    assert check_results.check(page) == []
    page.write_text("47.6 minutes<!-- check: o.json#train_seconds .1fmin -->\n")
    assert "'47.7'" in check_results.check(page)[0]
