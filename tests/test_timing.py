"""Where a notebook's time goes: phases counted once (outermost), written for the pipeline, and
the notebook's wall time split into them plus the rest."""

import json
import time

import pytest

from sae_repro import timing


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setattr(timing, "_spent", dict.fromkeys(timing.PHASES, 0.0))


def test_a_phase_counts_its_wall_time_and_nested_phases_count_once(tmp_path, monkeypatch):
    monkeypatch.setenv(timing.TIMING_ENV, str(tmp_path / "t.json"))
    with timing.phase("training"):
        time.sleep(0.05)
        with timing.phase("collection"):  # inside training: training's time, not collection's
            time.sleep(0.05)
    with timing.phase("plotting"):
        time.sleep(0.02)
    spent = timing.spent()
    assert 0.09 < spent["training"] < 0.5
    assert spent["collection"] == 0.0
    assert 0.015 < spent["plotting"] < 0.4
    written = json.loads((tmp_path / "t.json").read_text())
    assert written == {p: round(s, 2) for p, s in spent.items()}


def test_a_phase_that_raises_is_still_counted():
    with pytest.raises(RuntimeError):
        with timing.phase("collection"):
            time.sleep(0.02)
            raise RuntimeError("boom")
    assert timing.spent()["collection"] > 0.015
    with timing.phase("training"):  # the failed phase left nothing open
        pass
    assert timing.spent()["training"] > 0


def test_timed_decorator_and_unknown_phase():
    @timing.timed("plotting")
    def draw(x: int) -> int:
        time.sleep(0.02)
        return x + 1

    assert draw(1) == 2 and timing.spent()["plotting"] > 0.015
    with pytest.raises(ValueError, match=r"name='drawing'; allowed: collection, training, plotting"):
        with timing.phase("drawing"):
            pass


def test_split_gives_the_rest_to_analysis(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"collection": 10.0, "training": 20.0, "plotting": 5.0}))
    assert timing.split(path, 50.0) == {"collection": 10.0, "training": 20.0, "plotting": 5.0, "analysis": 15.0}
    assert timing.split(path, 30.0)["analysis"] == 0.0  # never negative (clock granularity)
    assert timing.split(tmp_path / "missing.json", 7.0) == {
        "collection": 0.0, "training": 0.0, "plotting": 0.0, "analysis": 7.0}


def test_the_reproducibility_table_shows_the_split(tmp_path, monkeypatch):
    from sae_repro import book

    runs = {"alpha": {"status": "ok", "seconds": 60.0, "started": "2026-12-02T03:00:00+00:00",
                      "split": {"collection": 30.0, "training": 20.0, "analysis": 8.0, "plotting": 2.0},
                      "hardware": {"cpus": 2, "cpu": "AMD EPYC", "memory_gb": 24}},
            "beta": {"status": "ok", "seconds": 6.0, "hardware": {"cpus": 2, "cpu": "AMD EPYC", "memory_gb": 24}}}
    monkeypatch.setattr(book, "_runs", lambda p: runs if p == "default" else {})
    lines = book.runs_table().splitlines()
    assert lines[0].startswith("| notebook | profile | wall time | collection | training | analysis | plotting |")
    assert all(line.count("|") == lines[0].count("|") for line in lines[1:5])
    assert "| `alpha` | default | 60 s | 30 s | 20 s | 8 s | 2 s |" in lines[2]
    assert "| `beta` | default | 6 s | — | — | — | — |" in lines[3]  # a record from before the split
    total = "| **all notebooks** | default | **1.1 min** | **0.5 min** | **0.3 min** | **0.1 min** | **0.0 min** |"
    assert total in lines[4]
