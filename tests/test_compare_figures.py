"""The script that checks a refactor changed no number finds every kind of difference."""

import importlib.util
import json
from pathlib import Path

import pandas as pd

_spec = importlib.util.spec_from_file_location("compare_figures", Path(__file__).with_name("compare_figures.py"))
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)


def _write(root: Path, value: float, word: str = "partly", verdict: str = "partly") -> Path:
    root.mkdir()
    pd.DataFrame({"width": [128, 256], "fvu": [0.25, value], "verdict": ["reproduced", word]}).to_csv(
        root / "fig.csv", index=False)
    (root / "verdicts.json").write_text(json.dumps({"c": {"claim": "x", "paper": "p", "ours": "0.25",
                                                          "verdict": verdict, "why": "w"}}))
    return root


def test_identical_and_within_tolerance(tmp_path):
    old = _write(tmp_path / "old", 0.125)
    assert compare.compare_dirs(old, _write(tmp_path / "same", 0.125)) == []
    assert compare.compare_dirs(old, _write(tmp_path / "noise", 0.125 + 1e-15)) == []
    assert compare.main([str(old), str(tmp_path / "same")]) == 0


def test_every_kind_of_difference_is_reported(tmp_path):
    old = _write(tmp_path / "old", 0.125)
    assert any("fvu" in d for d in compare.compare_dirs(old, _write(tmp_path / "num", 0.125 + 1e-9)))
    assert any("'verdict'" in d for d in compare.compare_dirs(old, _write(tmp_path / "word", 0.125, "no")))
    assert any("c.verdict" in d for d in compare.compare_dirs(old, _write(tmp_path / "v", 0.125, verdict="x")))
    extra = _write(tmp_path / "extra", 0.125)
    (extra / "more.csv").write_text("a\n1\n")
    assert compare.compare_dirs(old, extra) == ["more.csv: only in new"]
    assert compare.main([str(old), str(tmp_path / "num")]) == 1
