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
