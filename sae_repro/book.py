"""Build the Jupyter Book (1.x, Sphinx) from the executed notebooks, offline.

Before Sphinx runs, `build` writes the pages that are generated from the code (the profiles
table, measured run times, the figure list, the API reference's module list) into
`book/_generated/`, copies the figures' files into `_static/figures/<profile>/` (so that each
figure's PNG, SVG and CSV can be downloaded from the page that shows it) and a local MathJax into
`_static/mathjax/`: equations render without a CDN. (Both are copied to `book/_generated/static/`,
which Sphinx serves as `_static/`; the book has no `_static/` folder of its own, since jupyter-book
would load every script under it on every page.) MathJax comes from the npm registry
(`npm pack mathjax@3.2.2`, integrity-checked) into the cache once.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import pkgutil
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import sae_repro
from sae_repro import pipeline
from sae_repro.cache import atomic_path, cache_dir, read_json
from sae_repro.figures import figures_dir, verdicts_of
from sae_repro.profiles import PROFILE_NAMES, profile, rule_for

MATHJAX_VERSION = "3.2.2"
# npm's dist.integrity of mathjax@3.2.2
MATHJAX_SRI = ("sha512-Bt+SSVU8eBG27zChVewOicYs7Xsdt40qm4+UpHyX7k0/O9NliPc+x77k1/FEsPsjKPZGJvtRZM1vO+"
               "geW0OhGw==")
# Other single-file bundles of the package; the book loads es5/tex-chtml.js only.
_UNUSED_BUNDLES = ("mml-chtml.js", "mml-svg.js", "tex-chtml-full-speech.js", "tex-chtml-full.js",
                   "tex-mml-chtml.js", "tex-mml-svg.js", "tex-svg-full.js", "tex-svg.js",
                   "node-main.js", "svg")


# ---------------------------------------------------------------------------------------------
# MathJax, served from the book itself


def mathjax_dir() -> Path:
    """The unpacked npm `mathjax` package (its `es5/` folder) in the cache; fetched with npm."""
    root = cache_dir() / "mathjax" / MATHJAX_VERSION
    if (root / "es5" / "tex-chtml.js").exists():
        return root
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm not found: the book serves MathJax from the npm package "
                           f"mathjax@{MATHJAX_VERSION}; install npm (Debian: apt-get install npm)")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([npm, "pack", f"mathjax@{MATHJAX_VERSION}", "--silent"], cwd=tmp,
                              capture_output=True, text=True)
        tgz = Path(tmp) / f"mathjax-{MATHJAX_VERSION}.tgz"
        if proc.returncode != 0 or not tgz.exists():
            raise RuntimeError(f"npm pack mathjax@{MATHJAX_VERSION} failed:\n{proc.stderr[-2000:]}")
        algo, want = MATHJAX_SRI.split("-", 1)
        got = base64.b64encode(hashlib.new(algo, tgz.read_bytes()).digest()).decode()
        if got != want:
            raise RuntimeError(f"mathjax-{MATHJAX_VERSION}.tgz: integrity {algo}-{got} != {want}")
        with atomic_path(root) as out, tarfile.open(tgz) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/es5/")]
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # 3.10.12+
            tar.extractall(tmp, members=members, **safe)
            shutil.move(str(Path(tmp) / "package"), out)
    return root


def _copy_mathjax(static: Path) -> None:
    dest = static / "mathjax"
    if (dest / "tex-chtml.js").exists():
        return
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(mathjax_dir() / "es5", dest, ignore=shutil.ignore_patterns(*_UNUSED_BUNDLES))


# ---------------------------------------------------------------------------------------------
# Pages generated from the code


def _cell(v: Any) -> str:
    if v is None:
        return "—"
    return ", ".join(map(str, v)) if isinstance(v, list) else str(v)


def profiles_table() -> str:
    """Markdown: the values of each parameter per profile, then what each allows and who reads it."""
    users: dict[str, list[str]] = {}
    for nb in pipeline.notebook_paths():
        for name in pipeline.declared_parameters(nb):
            users.setdefault(name, []).append(nb.stem)
    values = {p: profile(p) for p in PROFILE_NAMES}
    names = list(values[PROFILE_NAMES[0]])
    table = ["| parameter | " + " | ".join(PROFILE_NAMES) + " |",
             "|---" * (len(PROFILE_NAMES) + 1) + "|"]
    table += [f"| `{n}` | " + " | ".join(_cell(values[p][n]) for p in PROFILE_NAMES) + " |"
              for n in names]
    rules = ["| parameter | allowed values | read by |", "|---|---|---|"]
    for n in names:
        rule = rule_for(n)
        readers = ", ".join(f"{{doc}}`{u} </chapters/{u}>`" for u in users.get(n, [])) or "—"
        rules.append(f"| `{n}` | {rule.describe() if rule else 'any value of its type'} | {readers} |")
    return "\n".join(table) + "\n\n" + "\n".join(rules) + "\n"


def _runs(p: str) -> dict[str, dict]:
    path = figures_dir(p) / "runs.json"
    return read_json(path)


def _when(iso: str) -> str:
    return iso.replace("T", " ")[:16] if iso else ""


SPLIT = ("collection", "training", "analysis", "plotting")  # runs.json's "split" (sae_repro.timing)


def _split_cells(split: dict[str, float] | None) -> str:
    if not split:
        return " | ".join("—" for _ in SPLIT)
    return " | ".join(f"{split.get(k, 0.0):.0f} s" for k in SPLIT)


def runs_table() -> str:
    """Markdown: measured run time of each notebook under each profile, split into collection,
    training, analysis and plotting (`sae_repro.timing`), from the run records."""
    rows, machines = [], {}
    blank = " | ".join("" for _ in SPLIT)
    for p in PROFILE_NAMES:
        total, parts = 0.0, dict.fromkeys(SPLIT, 0.0)
        for name, info in sorted(_runs(p).items()):
            if "seconds" not in info:
                rows.append(f"| `{name}` | {p} | failed | {blank} | {_when(info.get('failed_at', ''))} | — | — |")
                continue
            hw = info.get("hardware", {})
            machine = f"{hw.get('cpus')} cores ({hw.get('cpu')}), {hw.get('memory_gb')} GiB RAM"
            machine += f", GPU: {hw['gpu']}" if hw.get("gpu") else ", no GPU"
            machines.setdefault(machine, len(machines) + 1)
            status = "" if info.get("status") == "ok" else " (its next run failed)"
            load = info.get("load_at_start")
            rows.append(f"| `{name}` | {p} | {info['seconds']:.0f} s{status} | {_split_cells(info.get('split'))} | "
                        f"{_when(info.get('started', ''))} | {'—' if load is None else load} | "
                        f"{machines[machine]} |")
            total += info["seconds"]
            for k in SPLIT:
                parts[k] += (info.get("split") or {}).get(k, 0.0)
        if total:
            shares = " | ".join(f"**{parts[k] / 60:.1f} min**" for k in SPLIT)
            rows.append(f"| **all notebooks** | {p} | **{total / 60:.1f} min** | {shares} | | | |")
    if not rows:
        return "No notebook has been run yet.\n"
    head = ("| notebook | profile | wall time | " + " | ".join(SPLIT) + " | started (UTC) | load | machine |\n"
            + "|---" * (6 + len(SPLIT)) + "|\n")
    notes = "\n".join(f"- machine {i}: {m}" for m, i in machines.items())
    return head + "\n".join(rows) + "\n\n" + notes + "\n"


def _standing(entry: dict, source: str | None = None) -> str:
    """"current", or why a manifest entry is not: "stale", "notebook" or "source" (figure_status)."""
    if entry.get("stale"):
        return "stale"
    inputs = entry.get("inputs") or {}
    path = pipeline.notebooks_dir() / f"{entry['notebook']}.ipynb"
    if inputs.get("notebook") not in (None, pipeline.notebook_hash(path) if path.exists() else None):
        return "notebook"
    recorded, version = inputs.get("sae_repro"), sae_repro.__version__
    if recorded is None or recorded == (source or f"{version}+{pipeline.source_hash()}"):
        return "current"  # the whole package unchanged (what runs before 2026-12-08 recorded)
    if path.exists() and recorded == f"{version}+{pipeline.notebook_source(path)}":
        return "current"  # the modules its notebook runs unchanged
    return "source"


_STATUS_TEXT = {
    "current": "current",
    "stale": "**stale**: its notebook's last run failed",
    "notebook": "**from an earlier version of its notebook** (a run would remake it)",
    "source": "from an earlier version of the package's computing source (a run would remake it)",
    "run": "from a run other than the one that made its chapter's figures",  # verdicts only
}


def figure_status(entry: dict, source: str | None = None) -> str:
    """How a manifest entry stands against this checkout: "current", or why it is not (its
    notebook's last run failed; its notebook or the computing source it runs (its notebook's
    modules, `pipeline.notebook_modules`) changed since it was made, so `sae-repro run` would
    remake it). source: "version+source hash" of this checkout
    (computed here if not given; a caller listing many figures computes it once)."""
    return _STATUS_TEXT[_standing(entry, source)]


# The badge beside a verdict that is not current, by the reason (verdict_status).
_STATUS_BADGE = {"stale": "stale", "notebook": "earlier notebook", "source": "earlier source",
                 "run": "earlier run"}


def verdict_status(verdict: dict, manifest: dict, source: str | None = None, runs: dict | None = None) -> str:
    """How a recorded verdict stands: that of the figures its run published (a run publishes its
    figures and verdicts together, under one run key), so a verdict from an earlier notebook or
    computing source says so as its figures do. "run": no figure of its notebook carries its run
    key (the figures were remade since). A notebook without figures is judged by its last run's
    record (runs: the profile's runs.json), "run" if it has none. manifest: the profile's figures
    manifest."""
    if verdict.get("stale"):
        return "stale"
    mine = [e for e in manifest.values() if e["notebook"] == verdict.get("notebook")]
    made = [e for e in mine if e.get("run_key") == verdict.get("run_key")]
    if made:
        return _standing(made[0], source)
    record = (runs or {}).get(verdict.get("notebook"), {})
    if not mine and record.get("inputs"):
        return _standing({"notebook": verdict["notebook"], "inputs": record["inputs"]}, source)
    return "run"


def _statuses(prof: str, verdicts: list[dict]) -> list[str]:
    """verdict_status of each verdict of a profile, reading the manifest and the source once."""
    manifest, runs = read_json(figures_dir(prof) / "manifest.json"), _runs(prof)
    source = f"{sae_repro.__version__}+{pipeline.source_hash()}"
    return [verdict_status(v, manifest, source, runs) for v in verdicts]


def figures_list() -> str:
    """Markdown: every figure with its chapter, profile, status and the command that remakes it."""
    items, source = [], f"{sae_repro.__version__}+{pipeline.source_hash()}"  # read the package once
    for p in PROFILE_NAMES:
        path = figures_dir(p) / "manifest.json"
        manifest = read_json(path)
        for fig_id, e in sorted(manifest.items()):
            if e["profile"] != p:
                continue
            status = figure_status(e, source)
            items.append(f"- `{fig_id}` ({{doc}}`{e['notebook']} </chapters/{e['notebook']}>`, "
                         f"profile {p}, {status}, {_when(e['time'])} UTC): "
                         f"`{e.get('command', '')}`")
    return "\n".join(items) + "\n" if items else "No figures yet.\n"


def executed_profile(notebook: str) -> str | None:
    """The profile the executed copy of `notebook` in the book was run under (papermill records
    its parameters in the notebook), or None if it has not been executed."""
    path = pipeline.executed_dir() / f"{notebook}.ipynb"
    if not path.exists():
        return None
    meta = json.loads(path.read_text()).get("metadata", {})
    return meta.get("papermill", {}).get("parameters", {}).get("profile")


def _ours(v: dict) -> str:
    """Our number with its 95% interval and its trend with training budget, where recorded."""
    text = str(v["ours"])
    if v.get("interval"):
        lo, hi = v["interval"]
        text += f" (95% interval {lo:.3g} to {hi:.3g})"
    if v.get("trend"):
        text += f"; with more training: {v['trend']}"
    return text


def _badge(verdict: str, status: str = "current") -> str:
    """The verdict as a coloured text badge (CSS `sae-verdict-*` in book/_assets; text, not an
    emoji, so it shows where no emoji font is installed), and beside it, for a verdict that is not
    current (verdict_status), an outlined badge saying why."""
    slug = verdict.replace(" ", "-")
    text = f'<span class="sae-verdict sae-verdict-{slug}">{html.escape(verdict)}</span>'
    if status != "current":
        why = _STATUS_TEXT[status]
        text += (f' <span class="sae-verdict sae-verdict-{"stale" if status == "stale" else "earlier"}" '
                 f'title="{html.escape(why.replace("**", ""))}">{_STATUS_BADGE[status]}</span>')
    return text


def verdicts_table(notebooks: list[str] | None = None) -> str:
    """Each claim of the papers (from the notebooks' `record_verdict` calls, under the profile
    their book copies ran with): claim, the paper's number, ours (with its interval and trend),
    the verdict as a badge, and a link to the chapter, whose verdict line gives the criterion.

    Raw HTML (MyST passes it through) with fixed column widths, so the table wraps inside the
    page's content column instead of scrolling sideways."""
    rows = []
    names = notebooks or [p.stem for p in pipeline.notebook_paths()]
    for nb in names:
        prof = executed_profile(nb)
        if prof is None:
            continue
        mine = sorted(((c, v) for c, v in verdicts_of(prof).items() if v["notebook"] == nb),
                      key=lambda cv: (cv[1]["time"], cv[0]))  # the order the notebook found them
        statuses = _statuses(prof, [v for _, v in mine])
        for (claim_id, v), status in zip(mine, statuses):
            cells = [html.escape(str(v["claim"])), html.escape(str(v["paper"])), html.escape(_ours(v)),
                     _badge(v["verdict"], status),
                     f'<a href="chapters/{nb}.html">{html.escape(nb.replace("_", " "))}</a> ({html.escape(prof)})']
            rows.append(f'<tr id="verdict-{html.escape(claim_id)}">' + "".join(f"<td>{c}</td>" for c in cells)
                        + "</tr>")
    if not rows:
        return "No verdicts recorded yet.\n"
    head = "".join(f"<th>{h}</th>" for h in ("claim", "paper", "ours", "verdict", "chapter (profile)"))
    return ('<table class="sae-verdicts">\n<colgroup><col class="c-claim"><col class="c-paper"><col class="c-ours">'
            '<col class="c-verdict"><col class="c-where"></colgroup>\n'
            f"<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table>\n")


# A cell the book adds to an executed notebook (`present`): marked, so presenting twice is a no-op.
_ADDED = "sae_repro_added"


def _markdown(text: str) -> dict:
    return {"cell_type": "markdown", "metadata": {_ADDED: True}, "source": text.splitlines(True)}


def _tag(cell: dict, tag: str) -> None:
    tags = cell.setdefault("metadata", {}).setdefault("tags", [])
    if tag not in tags:
        tags.append(tag)


def present(nb: dict, name: str, profile: str | None, verdicts: list[dict]) -> dict:
    """An executed notebook as the book shows it, prose first (a copy; the outputs are untouched).

    After the opening markdown cell: the chapter's answer, its verdicts as badges. The notebook's
    own `parameters` cell is removed (papermill's injected one holds the values the run used and
    is shown, labelled with the profile and the command that reruns it). Every other code cell's
    input is folded behind a toggle (the Jupyter Book tag `hide-input`); outputs stay."""
    nb = json.loads(json.dumps(nb))
    cells = [c for c in nb["cells"] if not c.get("metadata", {}).get(_ADDED)]
    out: list[dict] = []
    for i, cell in enumerate(cells):
        tags = cell.get("metadata", {}).get("tags", [])
        if "injected-parameters" in tags:
            rerun = f"sae-repro run --profile {profile} --only {name}" if profile else f"sae-repro run --only {name}"
            out.append(_markdown(f"**Parameters of this run** (profile `{profile}`): rerun with `{rerun}`, "
                                 "and change one with `-p NAME VALUE`."))
        elif "parameters" in tags:
            _tag(cell, "remove-cell")
        elif cell["cell_type"] == "code":
            _tag(cell, "hide-input")
        out.append(cell)
        if i == 0 and cell["cell_type"] == "markdown" and verdicts:
            statuses = _statuses(profile, verdicts) if profile else ["current"] * len(verdicts)
            lines = [f"- {html.escape(str(v['claim']))}: {_badge(v['verdict'], st)}"
                     for v, st in zip(verdicts, statuses)]
            out.append(_markdown(f"**What this chapter finds** (profile `{profile}`; the numbers, "
                                 "intervals and criteria are in the verdict lines below):\n\n" + "\n".join(lines)))
    nb["cells"] = out
    return nb


def present_executed() -> None:
    """`present` every executed notebook in place (the pipeline writes them afresh on each run)."""
    for path in sorted(pipeline.executed_dir().glob("*.ipynb")):
        prof = executed_profile(path.stem)
        mine = [] if prof is None else sorted(
            (v for v in verdicts_of(prof).values() if v["notebook"] == path.stem), key=lambda v: v["time"])
        nb = json.loads(path.read_text())
        _write_if_changed(path, (json.dumps(present(nb, path.stem, prof, mine), indent=1, ensure_ascii=False)
                                 + "\n").encode())


# The book's parts by paper: a landing page (book/PART.md) includes its part's verdicts.
CHAPTER_PARTS = {
    "dark_matter": ("dark_matter_synthetic", "dark_matter_scaling", "dark_matter_layers",
                    "dark_matter_downstream", "dark_matter_reducing", "dark_matter_jumprelu",
                    "dark_matter_jumprelu_downstream"),
    "mutual_choice": ("mutual_choice",),
    "gradient_sae": ("gradient_sae", "reading_latents"),  # the latents chapter judges its interpretability claim
    "cross_paper": ("cross_paper",),
}

# Modules in the order of the flow; any others follow alphabetically.
_FLOW = ("corpus", "registry", "models", "activations", "sparsity", "kernels", "sae", "saelens",
         "losses", "train", "zoo", "metrics", "decomposition", "synthetic", "zipf", "steering",
         "experiments", "verdicts", "chapter", "cache", "figures", "profiles", "pipeline", "book",
         "cli")


def api_page() -> str:
    """One automodule directive per module of the package."""
    found = {m.name for m in pkgutil.iter_modules(sae_repro.__path__)} - {"__main__"}
    mods = [m for m in _FLOW if m in found] + sorted(found - set(_FLOW))
    # eval-rst: autodoc emits reStructuredText, which MyST would print as text; `name` in a
    # docstring is code, as in Markdown (Sphinx's default_role does not reach eval-rst blocks)
    return "\n".join(f"## `sae_repro.{m}`\n\n```{{eval-rst}}\n.. default-role:: literal\n\n"
                     f".. automodule:: sae_repro.{m}\n   :members:\n   :show-inheritance:\n```\n"
                     for m in mods)


def write_generated(book: Path) -> None:
    out = book / "_generated"
    out.mkdir(parents=True, exist_ok=True)
    pages = {"profiles.md": profiles_table(), "runs.md": runs_table(),
             "figures.md": figures_list(), "api.md": api_page(), "verdicts.md": verdicts_table()}
    for part, notebooks in CHAPTER_PARTS.items():
        pages[f"verdicts-{part}.md"] = verdicts_table(list(notebooks))
    for name, text in pages.items():
        _write_if_changed(out / name, text.encode())


def _write_if_changed(path: Path, data: bytes) -> None:
    """Leave an identical file alone: Sphinx rebuilds only pages whose sources changed."""
    if not (path.exists() and path.read_bytes() == data):
        path.write_bytes(data)


def _copy_figures(static: Path) -> None:
    for p in PROFILE_NAMES:
        path = figures_dir(p) / "manifest.json"
        manifest = read_json(path)
        dest = static / "figures" / p
        for entry in (e for e in manifest.values() if e["profile"] == p):
            dest.mkdir(parents=True, exist_ok=True)
            for f in entry["files"]:
                if (figures_dir(p) / f).exists():
                    _write_if_changed(dest / f, (figures_dir(p) / f).read_bytes())


# ---------------------------------------------------------------------------------------------
# The build


def stale_figures() -> list[str]:
    out = []
    for p in PROFILE_NAMES:
        path = figures_dir(p) / "manifest.json"
        manifest = read_json(path)
        out += [f"{k} ({p})" for k, e in manifest.items() if e.get("stale") and e["profile"] == p]
    return out


def build(out: Path | None = None) -> Path:
    """Generate pages, copy figures and MathJax, run jupyter-book; returns the index.html path."""
    book = pipeline.book_dir()
    missing = [p.name for p in pipeline.notebook_paths()
               if not (pipeline.executed_dir() / p.name).exists()]
    if missing:
        raise RuntimeError(f"notebooks not executed yet: {missing}; run `sae-repro run` first")
    toc = (book / "_toc.yml").read_text()
    unlisted = [p.stem for p in pipeline.notebook_paths() if f"chapters/{p.stem}" not in toc]
    if unlisted:  # only_build_toc_files would leave them out silently
        raise RuntimeError(f"notebooks missing from book/_toc.yml: {unlisted}; "
                           f"add `- file: chapters/NAME` under Chapters")
    if stale := stale_figures():
        print(f"[sae-repro] warning: stale figures (their notebook's last run failed; the book "
              f"shows the previous ones and says so on the reproducibility page): {stale}",
              file=sys.stderr)
    write_generated(book)
    present_executed()
    static = book / "_generated" / "static"  # served as _static/ (see _config.yml)
    _copy_figures(static)
    _copy_mathjax(static)
    jb = Path(sys.executable).parent / "jupyter-book"
    cmd = [str(jb), "build", str(book), "--builder", "html", "--warningiserror", "--keep-going"]
    if out is not None:
        cmd += ["--path-output", str(out)]
    subprocess.run(cmd, check=True)
    index = (out or book) / "_build" / "html" / "index.html"
    print(f"[sae-repro] book: {index}")
    return index


# ---------------------------------------------------------------------------------------------
# Sphinx extension (listed in book/_config.yml): docstrings that are not valid reStructuredText


def _rst_problems(text: str) -> list[str]:
    """Warnings docutils raises for `text`, ignoring Sphinx-only roles and directives."""
    import io

    from docutils import nodes
    from docutils.core import publish_doctree
    from docutils.parsers.rst import roles

    default = roles._roles.get("")  # a new document resets the default role: keep the page's
    try:
        doc = publish_doctree(text, settings_overrides={"report_level": 5, "halt_level": 5,
                                                        "warning_stream": io.StringIO()})
    except Exception as e:  # a construct only Sphinx can resolve (its roles need the build's env)
        return [f"docutils alone cannot parse it ({type(e).__name__})"]
    finally:
        if default is not None:
            roles._roles[""] = default
    problems = [m.astext() for m in doc.findall(nodes.system_message) if m["level"] >= 2]
    return [p for p in problems if "Unknown interpreted text role" not in p
            and "Unknown directive type" not in p and 'No role entry for' not in p
            and 'No directive entry for' not in p]


def _plain_docstrings(app, what, name, obj, options, lines: list[str]) -> None:
    """Show a docstring written as plain text (not reStructuredText) verbatim, so that the API
    reference renders every docstring and the build can still fail on any other warning."""
    if lines and _rst_problems("\n".join(lines)):
        import inspect

        raw = (inspect.getdoc(obj) or "\n".join(lines)).splitlines()
        lines[:] = ["::", ""] + [f"    {line}" for line in raw] + [""]


def setup(app) -> dict[str, Any]:
    app.setup_extension("sphinx.ext.napoleon")
    app.connect("autodoc-process-docstring", _plain_docstrings, priority=900)
    return {"parallel_read_safe": True}
