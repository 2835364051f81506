"""The pipeline: parameters checked before any kernel, reruns only what changed (parameters,
notebook, recorded data), failures stop the run and leave the previous figures marked stale;
figures carry what is needed to cite and regenerate them."""

import json
from pathlib import Path

import nbformat
import pytest
import yaml

from sae_repro import __version__, cli, figures, pipeline
from sae_repro.profiles import PROFILE_NAMES, check_parameter, parameters_for, profile

REPO = Path(__file__).resolve().parent.parent

# Two small notebooks: `alpha` reads a data file it declares with record_input, `beta` raises
# when asked to; both save a figure.
_BODY = """
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from sae_repro.figures import record_input, save_figure
{extra}
data = pd.DataFrame({{"x": [0, 1, 2], "y": [0, {value}, 0]}})
fig, ax = plt.subplots(figsize=(2, 2))
ax.plot(data.x, data.y)
# enough markers that saving takes well over the 0.1 s the run record's time split resolves
# (`timing.split` rounds to 0.1 s: a 3-point figure saves in ~0.03 s and would read 0.0)
ax.scatter([i / 30_000 for i in range(30_000)], [(i * 7919 % 1000) / 1000 for i in range(30_000)], s=1)
save_figure(fig, data, "{name}-fig", notebook="{name}", profile=profile, params={params},
            caption="A test figure.")
"""


def _notebook(path: Path, params: str, body: str) -> None:
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {path.stem}"), cell,
                nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture
def sandbox(tmp_path, monkeypatch) -> Path:
    """Notebooks, executed copies, figures and caches all under tmp_path."""
    for name in ("notebooks", "executed", "figures", "cache"):
        (tmp_path / name).mkdir()
    monkeypatch.setenv("SAE_REPRO_NOTEBOOKS", str(tmp_path / "notebooks"))
    monkeypatch.setenv("SAE_REPRO_EXECUTED", str(tmp_path / "executed"))
    monkeypatch.setenv("SAE_REPRO_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("SAE_REPRO_CACHE", str(tmp_path / "cache"))
    # others may edit the package while the tests run; a source change is tested on its own
    monkeypatch.setattr(pipeline, "source_hash", lambda *a, **k: "test-source")
    data = tmp_path / "data.txt"
    data.write_text("first version")
    _notebook(tmp_path / "notebooks" / "alpha.ipynb", 'profile = "default"\nalpha_n = 3',
              _BODY.format(name="alpha", value="alpha_n", params="dict(alpha_n=alpha_n)",
                           extra=f"record_input('data', {str(data)!r})"))
    _notebook(tmp_path / "notebooks" / "beta.ipynb", 'profile = "default"\nbeta_scale = 1.5',
              _BODY.format(name="beta", value="beta_scale", params="dict(beta_scale=beta_scale)",
                           extra='if beta_scale > 100:\n    raise ValueError("boom")'))
    return tmp_path


def _status(results) -> dict[str, str]:
    return {r.notebook: r.status for r in results}


def test_changing_one_parameter_reruns_only_the_notebooks_it_affects(sandbox):
    assert _status(pipeline.run("ci", jobs=2)) == {"alpha": "ran", "beta": "ran"}
    assert _status(pipeline.run("ci")) == {"alpha": "skipped", "beta": "skipped"}
    again = pipeline.run("ci", overrides={"alpha_n": 4})
    assert _status(again) == {"alpha": "ran", "beta": "skipped"}
    assert again[0].reason == "parameters changed: alpha_n"
    manifest = json.loads((sandbox / "figures" / "manifest.json").read_text())
    assert manifest["alpha-fig"]["params"] == {"alpha_n": 4}
    assert manifest["alpha-fig"]["command"] == "sae-repro run --profile ci --only alpha -p alpha_n 4"


def test_changed_data_or_package_reruns_what_depends_on_it(sandbox, monkeypatch):
    pipeline.run("ci")
    entry = json.loads((sandbox / "figures" / "manifest.json").read_text())["alpha-fig"]
    assert entry["inputs"]["data"] == figures.path_hash(sandbox / "data.txt")
    assert set(entry["inputs"]) == {"data", "notebook", "sae_repro"}
    (sandbox / "data.txt").write_text("second version")
    again = pipeline.run("ci")
    assert _status(again) == {"alpha": "ran", "beta": "skipped"}
    assert again[0].reason == "input data changed"
    monkeypatch.setattr(pipeline, "source_hash", lambda *a, **k: "edited-source")
    again = pipeline.run("ci", jobs=2)
    assert [r.reason for r in again] == ["sae_repro package changed"] * 2


def test_notebooks_run_in_the_order_asked_after_what_they_depend_on():
    def job(name, after=()):
        return pipeline.Job(Path(f"{name}.ipynb"), {}, {}, list(after))

    given = [job("zoo"), job("gsae", ["zoo"]), job("latents", ["gsae"]), job("layers"), job("cross", ["zoo"])]
    assert [j.name for j in pipeline._ordered(given)] == ["zoo", "gsae", "latents", "layers", "cross"]
    given = [job("gsae", ["zoo"]), job("layers"), job("zoo")]  # moved only as far as it must
    assert [j.name for j in pipeline._ordered(given)] == ["layers", "zoo", "gsae"]
    assert [j.name for j in pipeline._ordered([job("gsae", ["zoo"])])] == ["gsae"]  # zoo not selected
    with pytest.raises(ValueError, match="cycle"):
        pipeline._ordered([job("a", ["b"]), job("b", ["a"])])


def test_dry_run_says_what_would_run_and_why_and_runs_nothing(sandbox, capsys):
    assert cli.main(["run", "--profile", "ci", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "alpha (ci): would run (no executed copy)" in out and "beta (ci): would run" in out
    assert not (sandbox / "figures" / "manifest.json").exists()  # nothing ran
    pipeline.run("ci")
    assert cli.main(["run", "--profile", "ci", "--dry-run", "-p", "alpha_n", "4"]) == 0
    out = capsys.readouterr().out
    assert "alpha (ci): would run (parameters changed: alpha_n)" in out and "beta (ci): current" in out
    assert cli.main(["run", "--profile", "ci", "--dry-run", "--force", "--only", "beta"]) == 0
    assert capsys.readouterr().out.strip() == "[sae-repro] beta (ci): would run (--force)"
    assert cli.main(["run", "--profile", "ci", "--dry-run", "-p", "nope", "1"]) == 1  # checked as a run is
    assert pipeline.pending("ci") == [("alpha", None), ("beta", None)]


def test_failing_notebook_exits_nonzero_and_keeps_the_previous_figure_marked_stale(
        sandbox, capsys):
    assert cli.main(["run", "--profile", "ci"]) == 0
    png = sandbox / "figures" / "beta-fig.png"
    before, executed = png.read_bytes(), (sandbox / "executed" / "beta.ipynb").read_text()
    assert cli.main(["run", "--profile", "ci", "-p", "beta_scale", "1000", "--jobs", "2"]) == 1
    err = capsys.readouterr().err
    assert "notebook beta failed in cell 3 (ValueError: boom)" in err
    assert 'cell 3: line ' in err and 'raise ValueError("boom")' in err  # the line that raised
    assert png.read_bytes() == before  # the previous figure is kept ...
    manifest = json.loads((sandbox / "figures" / "manifest.json").read_text())
    assert manifest["beta-fig"]["stale"] is True  # ... and marked stale
    assert manifest["alpha-fig"]["stale"] is False
    assert (sandbox / "executed" / "beta.ipynb").read_text() == executed
    runs = json.loads((sandbox / "figures" / "runs.json").read_text())
    assert runs["beta"]["status"] == "failed" and runs["alpha"]["status"] == "ok"
    split = runs["alpha"]["split"]  # the notebook's time by phase: it only saved a figure
    assert set(split) == {"collection", "training", "plotting", "analysis"}
    assert split["plotting"] > 0 and split["collection"] == split["training"] == 0
    assert sum(split.values()) == pytest.approx(runs["alpha"]["seconds"], abs=0.3)
    # the next good run refreshes it, even with the same inputs as the last successful run
    assert _status(pipeline.run("ci")) == {"alpha": "skipped", "beta": "ran"}
    manifest = json.loads((sandbox / "figures" / "manifest.json").read_text())
    assert manifest["beta-fig"]["stale"] is False


def _no_kernel(*args, **kwargs):
    raise AssertionError("a kernel was started")


def test_bad_parameters_are_rejected_before_a_kernel_starts(monkeypatch):
    import papermill

    monkeypatch.setattr(papermill, "execute_notebook", _no_kernel)
    with pytest.raises(pipeline.ParameterError, match=r"unknown parameter.*'no_such'(.|\n)*"
                                                      r"syn_n_tokens: int = 40000 \(>= 1\)"):
        pipeline.run("ci", overrides={"no_such": 1})
    with pytest.raises(pipeline.ParameterError, match=r"syn_n_tokens=-5: must be >= 1"):
        pipeline.run("ci", overrides={"syn_n_tokens": -5})
    with pytest.raises(pipeline.ParameterError, match=r"layers=\['a'\]: expected list of int"):
        pipeline.run("ci", overrides={"layers": ["a"]})
    with pytest.raises(pipeline.ParameterError, match=r"seed=1.5: expected int"):
        pipeline.run("ci", only=["dark_matter_synthetic"], overrides={"seed": 1.5})
    with pytest.raises(pipeline.ParameterError, match="unknown parameter.*mad_n_tokens"):
        pipeline.run("ci", only=["dark_matter_synthetic"], overrides={"mad_n_tokens": 10})
    with pytest.raises(pipeline.ParameterError, match="--profile"):
        pipeline.run("ci", overrides={"profile": "full"})
    with pytest.raises(ValueError, match="unknown notebook"):
        pipeline.notebook_paths(["nope"])
    nb = pipeline.notebook_paths(["dark_matter_synthetic"])[0]
    with pytest.raises(ValueError, match=r"unknown parameter(.|\n)*syn_n_tokens"):
        pipeline.run_notebook(nb, "ci", {"no_such_param": 1})
    # ints are fine where floats are expected; an override reaches only the notebooks declaring it
    jobs = pipeline.plan("ci", overrides={"syn_noise_scales": [0, 1], "mad_n_tokens": 10})
    by_name = {j.name: j for j in jobs}
    assert by_name["dark_matter_synthetic"].overrides == {"syn_noise_scales": [0, 1]}
    assert by_name["model_and_data"].params["mad_n_tokens"] == 10


@pytest.mark.parametrize("overrides, match", [
    ({"an_n_train": -5}, r"an_n_train=-5: must be >= 1"),
    ({"an_n_test": 0}, r"an_n_test=0: must be >= 1"),
    ({"an_n_train": 100}, r"an_n_train must be >= sae_batch_size \(one batch\); got an_n_train=100, "
                          r"sae_batch_size=256"),
    ({"zoo_n_test": 100}, r"zoo_n_test must be >= zoo_batch_size"),
    ({"main_k": 300, "dm_ks": [4, 8, 300]}, r"k=300 is more latents than the narrowest SAE it trains has "
                                             r"\(256 = 4 x d_model 64 of tiny-random\)"),
    ({"dm_ks": [4, 200], "main_k": 4}, r"dm_ks=\[4, 200\]: k=200 .* \(128 = 2 x d_model 64"),
    ({"model": "nosuchmodel"}, r"model='nosuchmodel': use one of the embedded"),
    ({"corpus": "nosuchcorpus"}, r"corpus='nosuchcorpus': use one of \('gutenberg-shakespeare',\) or a Hugging"),
    ({"sae_layer": 2}, r"sae_layer=2: tiny-random has layers 0..1"),
    ({"sae_layer": 0}, r"sae_layer=0: must be >= 1"),
    ({"layers": [0, 5]}, r"layers=\[0, 5\]: tiny-random has layers 0..1"),
])
def test_joint_and_model_rules_are_checked_before_a_kernel(monkeypatch, overrides, match):
    import papermill

    monkeypatch.setattr(papermill, "execute_notebook", _no_kernel)
    with pytest.raises(pipeline.ParameterError, match=match):
        pipeline.run("ci", overrides=overrides)


@pytest.mark.parametrize("jobs", [0, -1, 1.5])
def test_jobs_must_be_a_positive_whole_number(monkeypatch, jobs, capsys):
    import papermill

    monkeypatch.setattr(papermill, "execute_notebook", _no_kernel)
    with pytest.raises(pipeline.ParameterError, match="jobs"):
        pipeline.run("ci", jobs=jobs)
    if isinstance(jobs, int):
        assert cli.main(["run", "--profile", "ci", "--jobs", str(jobs)]) == 1
        assert "jobs=" in capsys.readouterr().err


def test_type_and_range_rules():
    assert check_parameter("x", 3, 2.5) is None
    assert check_parameter("x", True, 1) == "x=True: expected int (like the default 1)"
    assert check_parameter("x", "cpu", None) is None
    assert "must be one of" in check_parameter("device", "tpu", "cpu")
    assert "must be >= 0.0" in check_parameter("syn_noise_scales", [0.5, -1.0], [0.0])
    assert "must be >= 1" in check_parameter("new_chapter_n_tokens", 0, 100)


def test_profiles_are_one_table_and_valid_for_every_notebook():
    keys = list(profile("ci"))
    assert all(list(profile(p)) == keys for p in PROFILE_NAMES)  # same parameters, same order
    profile("ci")["layers"].append(99)
    assert 99 not in profile("ci")["layers"]  # a copy: a caller cannot change the table
    with pytest.raises(ValueError, match="unknown profile"):
        profile("huge")
    assert parameters_for("ci", ["seed", "nope"]) == {"seed": 0, "profile": "ci"}
    for p in PROFILE_NAMES:
        pipeline.plan(p)  # raises if a profile's value does not fit a notebook's parameter
    # a notebook's parameters cell holds the `default` profile's values
    default = profile("default")
    for nb in pipeline.notebook_paths():
        for name, value in pipeline.declared_parameters(nb).items():
            # every parameter is a profile's (Chapter.open picks them out of the notebook's globals)
            assert name == "profile" or name in default, f"{nb.stem}: {name} is in no profile"
            if name in default:
                assert value == default[name], f"{nb.stem}: {name}={value!r} != {default[name]!r}"


def test_list_shows_one_profiles_values(capsys):
    assert cli.main(["list", "--profile", "ci"]) == 0
    out = capsys.readouterr().out
    assert "notebook" in out and "profile ci:" in out
    assert "  model = 'tiny-random'" in out and "main_k: int = 8 (>= 1)" in out  # ci's values
    assert cli.main(["list"]) == 0
    assert "list --profile NAME" in capsys.readouterr().out


def test_full_profile_names_gpt2_and_its_pretrained_saes():
    full = profile("full")
    assert (full["model"], full["device"], full["sae_layer"]) == ("gpt2", "cuda", 6)
    registry = yaml.safe_load((Path(__import__("sae_lens").__file__).parent / "pretrained_saes.yaml").read_text())
    for spec in full["pretrained_saes"]:  # each names a release and an SAE that SAELens knows
        release, sae_id = spec.split(":", 1)
        assert release in registry, release
        ids = [s["id"] for s in registry[release]["saes"]]
        assert sae_id in ids, (release, sae_id)
        assert sae_id.startswith(("blocks.6.hook_resid_post", "blocks.7.hook_resid_pre"))  # = sae_layer 6's output


def test_figure_citation_block():
    c = figures.FigureCitation("dm-x", "A caption.", "0.1.0", "0123456789abcdef", False,
                               figures.regenerate_command("ci", "nb", {"layers": [1, 2],
                                                                       "model": "gpt2"}), "ci")
    assert c.citation == "sae-repro contributors (2026), figure dm-x, sae-repro 0.1.0, commit 0123456789ab"
    assert c.command == "sae-repro run --profile ci --only nb -p layers '[1, 2]' -p model gpt2"
    html = c._repr_html_()
    assert 'id="figure-dm-x"' in html and c.citation in html and "../_static/figures/ci/dm-x.csv" in html


def test_citation_cff_is_valid_and_agrees_with_the_package():
    import jsonschema

    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    schema = json.loads((REPO / "tests" / "data" / "cff-1.2.0.schema.json").read_text())
    jsonschema.Draft7Validator(schema, format_checker=jsonschema.FormatChecker()).validate(cff)
    assert cff["version"] == __version__
    assert str(cff["date-released"]).startswith(str(figures.CITATION_YEAR))
    bib = (REPO / "book" / "references.bib").read_text()
    for arxiv in ("2410.14670", "2411.02124", "2411.10397"):
        assert arxiv in bib and arxiv in (REPO / "CITATION.cff").read_text()


def test_parameters_that_must_agree_are_checked_together():
    """Chapters share SAEs through main_k / main_expansion: an override that breaks the link
    fails before any kernel, naming both parameters."""
    from sae_repro.profiles import joint_errors

    for p in PROFILE_NAMES:
        assert joint_errors(profile(p)) == [], p
    errs = joint_errors(profile("default") | {"main_k": 48})
    assert any("main_k must be one of dm_ks" in e and "dm_ks=" in e for e in errs)
    assert joint_errors({"main_k": 48}) == []  # only rules whose parameters are all present


def test_source_hash_ignores_modules_no_notebook_computes_with(tmp_path, monkeypatch):
    pkg = tmp_path / "sae_repro"
    pkg.mkdir()
    for name in ("sae.py", "book.py", "profiles.py"):
        (pkg / name).write_text(f"# {name}\n")
    monkeypatch.setattr(pipeline, "REPO", tmp_path)
    before = pipeline.source_hash()
    (pkg / "book.py").write_text("# the book's layout changed\n")
    (pkg / "profiles.py").write_text("# a rule's message changed\n")
    assert pipeline.source_hash() == before  # no notebook reruns for these
    (pkg / "sae.py").write_text("# sae.py\nk = 2  # the SAE changed\n")
    assert pipeline.source_hash() != before


def test_a_notebook_is_keyed_by_the_modules_it_can_run_only(tmp_path, monkeypatch):
    pkg = tmp_path / "sae_repro"
    (pkg / "sub").mkdir(parents=True)
    files = {"__init__.py": "__version__ = '1'\n", "a.py": "from sae_repro.b import f\n",
             "b.py": "def f():\n    from sae_repro import c  # a function-level import counts\n",
             "c.py": "import sae_repro.sub.d\n", "sub/__init__.py": "", "sub/d.py": "x = 1\n",
             "lone.py": "y = 2\n", "pipeline.py": "from sae_repro import lone\n", "other.py": "z = 0\n"}
    for name, text in files.items():
        (pkg / name).write_text(text)
    monkeypatch.setattr(pipeline, "REPO", tmp_path)
    nb = tmp_path / "nb.ipynb"
    _notebook(nb, "k = 1", "%matplotlib inline\nfrom sae_repro.a import f\nfrom sae_repro import pipeline")
    mods = pipeline.notebook_modules(nb)
    # pipeline.py drives, it does not compute: left out, but what it imports can run
    assert mods == ["__init__.py", "a.py", "b.py", "c.py", "lone.py", "sub/__init__.py", "sub/d.py"]
    before, whole = pipeline.notebook_source(nb), pipeline.source_hash()
    (pkg / "other.py").write_text("z = 3\n")  # no module the notebook runs imports it
    assert pipeline.notebook_source(nb) == before and pipeline.source_hash() != whole
    (pkg / "sub/d.py").write_text("x = 2\n")  # imported three modules down
    assert pipeline.notebook_source(nb) != before
    every = [p for p in files if p != "pipeline.py"]
    assert pipeline.source_hash(every) == pipeline.source_hash()  # all of them: the whole package's
    _notebook(nb, "k = 1", "from sae_repro.a import (\n    f,\n")  # does not parse: every module
    assert pipeline.notebook_modules(nb) == sorted(every) and pipeline.blind_cells(nb) == [2]
    # a relative import inside the package counts; so does the code a magic line runs
    (pkg / "sub" / "d.py").write_text("from . import e\nfrom .. import lone\n")
    (pkg / "sub" / "e.py").write_text("")
    _notebook(nb, "%matplotlib inline\nk = 1", "import sae_repro.sub.d\nx = (1\n     != 2)")
    assert pipeline.notebook_modules(nb) == ["__init__.py", "lone.py", "sub/__init__.py", "sub/d.py", "sub/e.py"]
    every += ["sub/e.py"]
    for blind in ("%time from sae_repro import c", "!python -m sae_repro.c", "import importlib\n"
                  "importlib.import_module('sae_repro.c')", "__import__('sae_repro.c')",
                  "if True:\n    %time import sae_repro.c"):
        _notebook(nb, "k = 1", blind)
        assert pipeline.notebook_modules(nb) == sorted(every), blind
    (pkg / "lone.py").write_text("import runpy\n")  # a module the scan cannot follow: every module
    _notebook(nb, "k = 1", "import sae_repro.sub.d")
    assert pipeline.notebook_modules(nb) == sorted(every)


def test_no_notebook_of_ours_is_blind_to_the_scan():
    """Every chapter's imports are read statically (a blind cell would make it rerun on any edit)."""
    nbs = sorted((REPO / "notebooks").glob("*.ipynb"))
    assert nbs and all(pipeline.blind_cells(nb) == [] for nb in nbs), {nb.stem: pipeline.blind_cells(nb) for nb in nbs}
    every = pipeline._every_module(REPO / "sae_repro")
    assert "steering.py" not in pipeline.notebook_modules(REPO / "notebooks" / "dark_matter_scaling.ipynb")
    assert set(pipeline.notebook_modules(REPO / "notebooks" / "gradient_sae.ipynb")) < set(every)


def test_a_notebook_edited_while_it_runs_publishes_nothing(sandbox):
    nb = sandbox / "notebooks" / "gamma.ipynb"
    _notebook(nb, 'profile = "default"\ngamma_n = 1',
              _BODY.format(name="gamma", value="gamma_n", params="dict(gamma_n=gamma_n)",
                           extra=f"import pathlib\np = pathlib.Path({str(nb)!r})\n"
                                 "p.write_text(p.read_text().replace('gamma_n = 1', 'gamma_n = 1  # edited'))"))
    with pytest.raises(pipeline.NotebookFailed, match="edited while it ran"):
        pipeline.run("ci", only=["gamma"])
    assert "gamma-fig" not in figures.read_json(sandbox / "figures" / "manifest.json")  # nothing published
    assert pipeline.pending("ci", only=["gamma"]) == [("gamma", "its last run did not finish")]


def test_a_run_recorded_with_the_whole_packages_hash_is_still_current(sandbox, monkeypatch):
    from sae_repro import book

    pipeline.run("ci", only=["alpha"])
    stamp_path = pipeline._stamp_path("alpha", "ci")
    stamp = json.loads(stamp_path.read_text())
    stamp["parts"]["source"] = "whole-package"  # as runs before per-notebook sources recorded it
    stamp_path.write_text(json.dumps(stamp))
    manifest = json.loads((sandbox / "figures" / "manifest.json").read_text())
    entry = manifest["alpha-fig"]
    entry["inputs"]["sae_repro"] = "0.1.0+whole-package"
    monkeypatch.setattr(pipeline, "source_hash", lambda modules=None, pkg=None:
                        "whole-package" if modules is None else "alpha-modules")
    assert _status(pipeline.run("ci", only=["alpha"])) == {"alpha": "skipped"}
    assert book.figure_status(entry) == "current"
    monkeypatch.setattr(pipeline, "source_hash", lambda modules=None, pkg=None:
                        "edited-package" if modules is None else "alpha-modules")
    assert book.figure_status(entry) != "current"  # neither the whole nor its modules' hash
    assert pipeline.why_run(pipeline.plan("ci", only=["alpha"])[0], "ci") == "sae_repro package changed"
    assert book.figure_status(entry | {"inputs": entry["inputs"] | {"sae_repro": "0.1.0+alpha-modules"}}) \
        == "current"
    verdict = {"notebook": "alpha", "run_key": entry["run_key"]}
    fresh = {"alpha-fig": entry | {"inputs": entry["inputs"] | {"sae_repro": "0.1.0+alpha-modules"}}}
    assert book.verdict_status(verdict, fresh) == "current"  # the whole package changed, not its modules


def test_source_hash_counts_code_not_docstrings_or_comments(tmp_path, monkeypatch):
    pkg = tmp_path / "sae_repro"
    pkg.mkdir()
    code = "def f(x):\n    return x + 1\n\n\nclass C:\n    n = 2\n"
    (pkg / "m.py").write_text(code)
    monkeypatch.setattr(pipeline, "REPO", tmp_path)
    before = pipeline.source_hash()
    documented = ('"""A module."""\n# why\ndef f(x):\n    """Add one:\n    |r| and all."""\n'
                  "    return x + 1\n\n\nclass C:\n    \"\"\"Two.\"\"\"\n\n    # count\n    n = 2\n")
    (pkg / "m.py").write_text(documented)
    assert pipeline.source_hash() == before  # docstrings, comments and blank lines do not count
    (pkg / "m.py").write_text(code.replace("x + 1", "x + 2"))
    assert pipeline.source_hash() != before
    (pkg / "m.py").write_text(code.replace("n = 2", "n = 2\n    s = 'a string, not a docstring'"))
    assert pipeline.source_hash() != before


# `gamma` saves two figures with a pause between them, and says when the first is written
_GAMMA = """
import pathlib, time
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from sae_repro.figures import save_figure
for i in (1, 2):
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, gamma_n])
    save_figure(fig, pd.DataFrame({"n": [gamma_n]}), f"gamma-{i}", notebook="gamma", profile=profile,
                params={"gamma_n": gamma_n}, caption="A test figure.")
    if marker:
        pathlib.Path(marker).write_text("first figure written")
        time.sleep(gamma_sleep)
"""


def _cli(*args: str, **kw):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "sae_repro", "run", "--profile", "ci", "--only", "gamma",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


def test_a_killed_run_publishes_nothing_and_the_next_run_reruns(sandbox):
    """SIGINT and SIGKILL while the notebook is between its two figures: the published figures stay
    those of the last successful run, none is marked fresh with other parameters, and the next run
    does not skip the notebook."""
    import os
    import signal
    import subprocess
    import time

    _notebook(sandbox / "notebooks" / "gamma.ipynb",
              'profile = "default"\ngamma_n = 1\ngamma_sleep = 0.0\nmarker = ""', _GAMMA)
    first = _cli()
    first_out = first.communicate(timeout=300)[0]
    assert first.returncode == 0, first_out
    manifest_path = sandbox / "figures" / "manifest.json"
    before = json.loads(manifest_path.read_text())
    png = (sandbox / "figures" / "gamma-1.png").read_bytes()
    for sig in (signal.SIGINT, signal.SIGKILL):
        marker = sandbox / f"marker-{sig.name}"
        proc = _cli("-p", "gamma_n", "5", "-p", "gamma_sleep", "120.0", "-p", "marker", str(marker))
        deadline = time.time() + 300
        while not marker.exists():
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "slow"
            time.sleep(0.2)
        os.killpg(proc.pid, sig)
        try:  # communicate, not wait: a full stdout pipe would block the run from exiting
            out = proc.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"{sig.name}: still running 60 s later; it wrote:\n{proc.communicate()[0]}")
        after = json.loads(manifest_path.read_text())
        for fig_id in ("gamma-1", "gamma-2"):  # as the last successful run left them
            assert after[fig_id]["params"] == {"gamma_n": 1} and not after[fig_id]["stale"], sig
            assert after[fig_id]["run_key"] == before[fig_id]["run_key"]
        assert (sandbox / "figures" / "gamma-1.png").read_bytes() == png
        if sig == signal.SIGINT:
            assert "interrupted" in out and "Traceback" not in out, out
    again = _cli()
    out = again.communicate(timeout=300)[0]
    assert again.returncode == 0 and "gamma (ci): ran" in out and "did not finish" in out, out
    assert "running over TCP" not in out  # the kernel's own warnings go to its log
    assert not list((sandbox / "executed").glob(".tmp-*"))  # the killed run's leftovers are gone
    assert not (sandbox / "figures" / ".staging" / "gamma").exists()


def test_the_book_says_which_figures_an_earlier_notebook_or_source_made(sandbox, monkeypatch):
    from sae_repro import book

    pipeline.run("ci", only=["alpha"])
    entry = json.loads((sandbox / "figures" / "manifest.json").read_text())["alpha-fig"]
    assert book.figure_status(entry) == "current"
    assert "current" in book.figures_list()
    monkeypatch.setattr(pipeline, "source_hash", lambda *a, **k: "edited-source")
    assert "computing source" in book.figure_status(entry)
    monkeypatch.setattr(pipeline, "source_hash", lambda *a, **k: "test-source")
    nb = sandbox / "notebooks" / "alpha.ipynb"
    nb.write_text(nb.read_text().replace("alpha_n = 3", "alpha_n = 3  # edited"))
    assert "earlier version of its notebook" in book.figure_status(entry)
    assert "stale" in book.figure_status(entry | {"stale": True})  # a failed last run says so first


def test_a_verdict_stands_as_the_figures_of_its_run_do(sandbox, monkeypatch):
    from sae_repro import book

    pipeline.run("ci", only=["alpha"])
    manifest = json.loads((sandbox / "figures" / "manifest.json").read_text())
    verdict = {"notebook": "alpha", "run_key": manifest["alpha-fig"]["run_key"], "verdict": "partly"}
    assert book.verdict_status(verdict, manifest) == "current"
    assert book.verdict_status(verdict | {"stale": True}, manifest) == "stale"
    assert book.verdict_status(verdict | {"run_key": "other"}, manifest) == "run"  # not its figures' run
    gamma = verdict | {"notebook": "gamma"}  # a notebook without figures: judged by its last run's record
    assert book.verdict_status(gamma, manifest) == "run"  # no record either
    gamma_nb = sandbox / "notebooks" / "gamma.ipynb"
    gamma_nb.write_bytes((sandbox / "notebooks" / "alpha.ipynb").read_bytes())
    record = {"gamma": {"inputs": {"notebook": pipeline.notebook_hash(gamma_nb), "sae_repro": "0.1.0+old"}}}
    assert book.verdict_status(gamma, manifest, runs=record) == "source"
    record["gamma"]["inputs"]["sae_repro"] = "0.1.0+test-source"
    assert book.verdict_status(gamma, manifest, runs=record) == "current"
    gamma_nb.unlink()
    monkeypatch.setattr(pipeline, "source_hash", lambda *a, **k: "edited-source")
    assert book.verdict_status(verdict, manifest) == "source"
    badge = book._badge("partly", "source")
    assert 'sae-verdict-partly">partly</span>' in badge and 'sae-verdict-earlier"' in badge
    assert ">earlier source</span>" in badge and "computing source" in badge  # its title says why
    assert book._badge("partly") == '<span class="sae-verdict sae-verdict-partly">partly</span>'
    monkeypatch.setattr(pipeline, "source_hash", lambda *a, **k: "test-source")
    nb = sandbox / "notebooks" / "alpha.ipynb"
    nb.write_text(nb.read_text().replace("alpha_n = 3", "alpha_n = 3  # edited"))
    assert book.verdict_status(verdict, manifest) == "notebook"
