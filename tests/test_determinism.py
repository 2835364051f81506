"""The same profile and seed give bit-identical figure data in two fresh caches on one machine.

Runs, twice from empty caches, the notebooks whose numbers pass through every step that could
drift: a store, trained SAEs, least-squares error decompositions, SAEs trained on the error parts
(keyed by the parts' bytes: a float-noise difference would retrain them), splices into the model.
"""

import importlib.util
import shutil
from pathlib import Path

import pytest

from sae_repro import pipeline
from sae_repro.cache import cache_dir

_spec = importlib.util.spec_from_file_location("compare_figures", Path(__file__).with_name("compare_figures.py"))
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)

NOTEBOOKS = ["dark_matter_synthetic", "dark_matter_downstream"]


def _fresh_run(root: Path, monkeypatch, notebooks: list[str] | None = NOTEBOOKS) -> Path:
    real = cache_dir()
    (root / "cache").mkdir(parents=True)
    for sub in ("pypi", "corpus", "models"):  # registry downloads only: no store, no SAE
        (real / sub).mkdir(exist_ok=True)
        (root / "cache" / sub).symlink_to(real / sub)
    monkeypatch.setenv("SAE_REPRO_CACHE", str(root / "cache"))
    monkeypatch.setenv("SAE_REPRO_EXECUTED", str(root / "executed"))
    monkeypatch.delenv("SAE_REPRO_FIGURES", raising=False)
    pipeline.run("ci", only=notebooks, jobs=1)
    return root / "cache" / "figures" / "ci"


@pytest.mark.parametrize("notebooks", [
    pytest.param(NOTEBOOKS, id="two-notebooks"),
    pytest.param(None, marks=pytest.mark.slow, id="every-notebook"),  # the whole ci profile: ~8 min
])
def test_two_fresh_runs_give_identical_figure_data(tmp_path, monkeypatch, notebooks):
    first = _fresh_run(tmp_path / "a", monkeypatch, notebooks)
    second = _fresh_run(tmp_path / "b", monkeypatch, notebooks)
    assert sorted(p.name for p in first.glob("*.csv")) == sorted(p.name for p in second.glob("*.csv"))
    assert len(list(first.glob("*.csv"))) >= 4
    assert compare.compare_dirs(first, second, tol=0.0) == []
    # and the error SAEs were keyed by identical bytes: the second run trained the same ones
    keys = [sorted(p.name for p in (tmp_path / r / "cache" / "saes").iterdir()) for r in ("a", "b")]
    assert keys[0] == keys[1]
    shutil.rmtree(tmp_path, ignore_errors=True)
