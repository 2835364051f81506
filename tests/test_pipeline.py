"""The walking skeleton: papermill runs a notebook under the `ci` profile, writes its figures with
CSV and manifest, and jupyter-book builds HTML that shows them."""

import json
import re

import pytest

from sae_repro import pipeline
from sae_repro.profiles import PROFILE_NAMES, parameters_for, profile


def test_profiles_are_one_table():
    keys = set(profile("ci"))
    assert all(set(profile(p)) == keys for p in PROFILE_NAMES)
    with pytest.raises(ValueError, match="unknown profile"):
        profile("huge")
    assert parameters_for("ci", ["seed", "nope"]) == {"seed": 0, "profile": "ci"}


def test_unknown_override_is_rejected_before_a_kernel_starts():
    nb = pipeline.notebook_paths(["dark_matter_synthetic"])[0]
    with pytest.raises(ValueError, match="unknown parameter.*syn_n_tokens"):
        pipeline.run_notebook(nb, "ci", {"no_such_param": 1})
    with pytest.raises(ValueError, match="unknown notebook"):
        pipeline.notebook_paths(["nope"])


def test_ci_profile_runs_and_book_shows_the_figure(isolated_cache, tmp_path, monkeypatch):
    figs = tmp_path / "figs"
    monkeypatch.setenv("SAE_REPRO_FIGURES", str(figs))
    first = pipeline.run("ci", only=["dark_matter_synthetic"])
    assert first[0].status == "ran"
    manifest = json.loads((figs / "manifest.json").read_text())
    for fig_id in ("dm-synthetic-table", "dm-synthetic-noise"):
        entry = manifest[fig_id]
        assert entry["profile"] == "ci" and entry["params"]["syn_n_tokens"] == 3_000
        for f in entry["files"]:
            assert (figs / f).stat().st_size > 0
    again = pipeline.run("ci", only=["dark_matter_synthetic"])
    assert again[0].status == "skipped"  # unchanged inputs
    index = pipeline.build_book()
    html = (index.parent / "chapters" / "dark_matter_synthetic.html").read_text()
    images = re.findall(r'<img [^>]*src="([^"]+)"', html)
    assert len(images) >= 2
    for src in images:
        assert (index.parent / "chapters" / src).resolve().stat().st_size > 1000
