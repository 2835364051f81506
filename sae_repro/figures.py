"""Save a figure people can cite: PNG + SVG + the CSV of the plotted data + a manifest entry.

The committed `figures/` hold the `default` profile's figures; other profiles write to
`.cache/figures/<profile>/` so a CI run never overwrites what the book cites.

A figure's manifest entry names what it was computed from: the notebook, profile, parameters,
package version, git commit and the hashes of its inputs. A notebook declares the data it reads
with `record_input(name, path)` (an activation store, another chapter's CSV via
`read_figure_data`); under the pipeline these land in a sidecar file that the pipeline rehashes to
decide whether the notebook must run again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import html
import json
import math
import os
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from sae_repro import __version__
from sae_repro.cache import atomic_path, cache_dir, read_json, sha256_file, update_json
from sae_repro.timing import timed
from sae_repro.verdicts import TRENDS, VERDICTS

REPO = Path(__file__).resolve().parent.parent
AUTHORS = "sae-repro contributors"
CITATION_YEAR = 2026  # as in CITATION.cff (a test checks they agree)
# Set by the pipeline for the kernel: JSON {"inputs": {name: {path, hash}}, "overrides": {...},
# "git": {"commit", "dirty"}}.
SIDECAR_ENV = "SAE_REPRO_SIDECAR"

_recorded: dict[str, dict[str, str | None]] = {}  # inputs recorded in this process


def figures_dir(profile: str) -> Path:
    """Where a profile's figures go: `figures/` for `default`, else the cache ($SAE_REPRO_FIGURES
    overrides both, for tests)."""
    env = os.environ.get("SAE_REPRO_FIGURES")
    root = Path(env) if env else (REPO / "figures" if profile == "default"
                                  else cache_dir() / "figures" / profile)
    root.mkdir(parents=True, exist_ok=True)
    return root


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""
    except OSError:
        return ""


def git_commit() -> str:
    """The checked-out commit, or "unknown" outside a git checkout."""
    return _git("rev-parse", "HEAD") or "unknown"


# What the numbers depend on: a change here, committed or not, makes the commit alone not enough.
_SOURCES = ("sae_repro", "notebooks", "pyproject.toml", "constraints.txt")


def git_dirty() -> bool:
    """True if the package, notebooks or pins differ from the commit (untracked files included)."""
    return bool(_git("status", "--porcelain", "--", *_SOURCES))


def _git_state() -> tuple[str, bool]:
    """(commit, dirty): as the pipeline saw them when the run started, else as they are now."""
    side = _sidecar().get("git")
    return (side["commit"], side["dirty"]) if side else (git_commit(), git_dirty())


# ---------------------------------------------------------------------------------------------
# Inputs: what a notebook read, by hash


def path_hash(path: str | Path) -> str:
    """sha256 of a file; of a folder, of its `manifest.json` if it has one (content-addressed stores
    list their shards' checksums there), else of every file's relative path and bytes.

    A store's shards are verified against its manifest too: a damaged or missing shard makes the
    hash differ (so the notebook reruns and `activations.collect` rebuilds the shard)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path, memo=True)
    if not path.is_dir():
        raise FileNotFoundError(f"input {path} does not exist")
    if (path / "manifest.json").is_file():
        digest = sha256_file(path / "manifest.json", memo=True)
        try:
            shards = json.loads((path / "manifest.json").read_text()).get("shards", [])
        except ValueError:  # bad JSON or not even UTF-8
            return f"unreadable:{digest}"
        for s in shards:
            f = path / s["file"]
            if not f.is_file() or sha256_file(f, memo=True) != s.get("sha256"):
                return f"damaged:{s['file']}:{digest}"
        return digest
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(path)).encode() + b"\0" + sha256_file(p, memo=True).encode())
    return h.hexdigest()


def _staging() -> Path | None:
    """Where this run stages its figures and verdicts: set by the pipeline, which publishes them
    (`publish`) only when the notebook has finished; None outside the pipeline (written live)."""
    side = _sidecar().get("staging")
    return Path(side) if side else None


def _sidecar() -> dict[str, Any]:
    side = os.environ.get(SIDECAR_ENV)
    return json.loads(Path(side).read_text()) if side and Path(side).exists() else {}


def record_input(name: str, path: str | Path) -> str:
    """Declare that this notebook read `path` (a file or a store folder); returns its hash.

    The hash goes into every figure saved afterwards and, under the pipeline, into the run's
    record: the next `sae-repro run` reruns the notebook if the file's content has changed."""
    entry = {"path": str(Path(path).resolve()), "hash": path_hash(path)}
    _recorded[name] = entry
    side = os.environ.get(SIDECAR_ENV)
    if side:
        update_json(Path(side), lambda d: d.setdefault("inputs", {}).update({name: entry}))
    return entry["hash"]


def recorded_inputs() -> dict[str, str]:
    """name -> hash of everything this run has read so far (the pipeline's entries included)."""
    entries = _sidecar().get("inputs", {}) | _recorded
    return {k: v["hash"] for k, v in sorted(entries.items())}


def read_figure_data(fig_id: str, profile: str) -> pd.DataFrame:
    """The CSV behind another chapter's figure, recorded as an input of this notebook."""
    path = figures_dir(profile) / f"{fig_id}.csv"
    if not path.exists():
        raise FileNotFoundError(f"figure {fig_id!r} ({profile}) not found at {path}: run the "
                                f"notebook that makes it first (`sae-repro list` names it)")
    record_input(f"figure:{fig_id}", path)
    return pd.read_csv(path)


# ---------------------------------------------------------------------------------------------
# Citation: shown under each figure in the book


def regenerate_command(profile: str, notebook: str, overrides: dict[str, Any]) -> str:
    """The one command that regenerates a notebook's figures with these parameter overrides."""
    parts = ["sae-repro", "run", "--profile", profile, "--only", notebook]
    for k, v in sorted(overrides.items()):
        parts += ["-p", k, v if isinstance(v, str) and not _is_literal(v) else repr(v)]
    return shlex.join(parts)


def _is_literal(text: str) -> bool:
    import ast

    try:
        ast.literal_eval(text)
        return True
    except (ValueError, SyntaxError):
        return False


@dataclass
class FigureCitation:
    """How to cite a figure and regenerate it; renders as HTML in the book, text in a terminal."""

    fig_id: str
    caption: str
    version: str
    commit: str
    dirty: bool
    command: str
    profile: str
    exts: tuple[str, ...] = ("png", "svg", "csv")  # the files it has (a page: html, csv)

    @property
    def citation(self) -> str:
        commit = self.commit[:12] + (" (with local changes)" if self.dirty else "")
        return (f"{AUTHORS} ({CITATION_YEAR}), figure {self.fig_id}, "
                f"sae-repro {self.version}, commit {commit}")

    def __str__(self) -> str:
        return (f"Figure {self.fig_id}. {self.caption}\nCite: {self.citation}\n"
                f"Regenerate: {self.command}")

    def _repr_html_(self) -> str:
        # Links assume the book layout: chapters one level deep, figures copied to
        # _static/figures/<profile>/ by `sae-repro book`.
        files = " · ".join(
            f'<a href="../_static/figures/{self.profile}/{self.fig_id}.{ext}">{ext.upper()}</a>'
            for ext in self.exts)
        e = html.escape
        return (f'<div class="sae-figure-cite" id="figure-{e(self.fig_id)}">'
                f"<p><strong>Figure <code>{e(self.fig_id)}</code>.</strong> {e(self.caption)}</p>"
                f"<p><em>Cite as:</em> {e(self.citation)}.</p>"
                f"<p><em>Regenerate:</em> <code>{e(self.command)}</code></p>"
                f"<p><em>Files:</em> {files}</p></div>")


def _display(*objects: Any) -> bool:
    """Display `objects` in order when running in a notebook; False (nothing shown) elsewhere."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return False
    if get_ipython() is None:
        return False
    for obj in objects:
        display(obj)
    return True


def _show(fig, citation: FigureCitation) -> None:
    """In a notebook, show the figure with its citation under it (then close it, so that a
    following plt.show() does not draw it twice)."""
    if _display(fig, citation):
        import matplotlib.pyplot as plt

        plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Saving


def _overrides(profile: str, params: dict[str, Any]) -> dict[str, Any]:
    """Parameters that differ from the profile: from the pipeline if it ran us, else guessed."""
    side = _sidecar()
    if "overrides" in side:
        return side["overrides"]
    from sae_repro.profiles import PROFILE_NAMES
    from sae_repro.profiles import profile as table

    values = table(profile) if profile in PROFILE_NAMES else {}
    return {k: v for k, v in params.items() if k in values and values[k] != _jsonable(v)}


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


@timed("plotting")
def save_figure(fig, data: pd.DataFrame, fig_id: str, *, notebook: str, profile: str,
                params: dict[str, Any], caption: str = "",
                inputs: dict[str, str] | None = None) -> Path:
    """Write `<fig_id>.png/.svg/.csv`, record it in `manifest.json` and, in a notebook, show it
    with how to cite and regenerate it. `inputs` (name -> hash) adds to those recorded with
    `record_input`. Returns the PNG path."""
    _check_fig_id(fig_id)
    root = _staging() or figures_dir(profile)
    for ext in ("png", "svg"):
        with atomic_path(root / f"{fig_id}.{ext}") as tmp:
            fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight",
                        metadata={"Date": None} if ext == "svg" else None)
    citation = _record(root, data, fig_id, ("png", "svg", "csv"), notebook=notebook, profile=profile,
                       params=params, caption=caption, inputs=inputs)
    _show(fig, citation)
    return root / f"{fig_id}.png"


@timed("plotting")
def save_page(fragment: str, data: pd.DataFrame, page_id: str, *, title: str, notebook: str,
              profile: str, params: dict[str, Any], caption: str = "",
              inputs: dict[str, str] | None = None, inline: bool = True) -> Path:
    """Write an HTML view (`sae_repro.views`) as the standalone page `<page_id>.html` with the
    data behind it as `<page_id>.csv`, record it in `manifest.json` like a figure and, in a
    notebook, show its citation (which links the page) after the view itself if `inline`.
    Returns the HTML path."""
    from sae_repro.views import page

    _check_fig_id(page_id)
    root = _staging() or figures_dir(profile)
    with atomic_path(root / f"{page_id}.html") as tmp:
        tmp.write_text(page(fragment, title), encoding="utf-8")
    citation = _record(root, data, page_id, ("html", "csv"), notebook=notebook, profile=profile,
                       params=params, caption=caption, inputs=inputs)
    shown: list[Any] = [citation]
    if inline:
        try:
            from IPython.display import HTML
        except ImportError:  # no IPython: nothing is shown anyway
            pass
        else:
            shown.insert(0, HTML(fragment))
    _display(*shown)
    return root / f"{page_id}.html"


def _check_fig_id(fig_id: str) -> None:
    if not fig_id.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"fig_id={fig_id!r}: use letters, digits, '-' and '_' only")


def _record(root: Path, data: pd.DataFrame, fig_id: str, exts: tuple[str, ...], *, notebook: str,
            profile: str, params: dict[str, Any], caption: str,
            inputs: dict[str, str] | None) -> FigureCitation:
    """Write the figure's CSV and its manifest entry -> its citation."""
    with atomic_path(root / f"{fig_id}.csv") as tmp:
        data.to_csv(tmp, index=False)
    commit, dirty = _git_state()
    citation = FigureCitation(fig_id, caption, __version__, commit, dirty,
                              regenerate_command(profile, notebook, _overrides(profile, params)),
                              profile, exts)
    entry = {
        "notebook": notebook, "profile": profile, "params": params, "caption": caption,
        "package_version": __version__, "git_commit": commit, "git_dirty": dirty,
        "inputs": recorded_inputs() | (inputs or {}),
        "files": [f"{fig_id}.{ext}" for ext in exts],
        "citation": citation.citation, "command": citation.command,
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "stale": False,
    }

    def add(manifest: dict) -> None:
        owner = manifest.get(fig_id, {}).get("notebook", notebook)
        if owner != notebook:
            raise ValueError(f"fig_id={fig_id!r} already belongs to notebook {owner!r}; "
                             f"figure ids must be unique across the book")
        manifest[fig_id] = entry

    update_json(root / "manifest.json", add)
    return citation


# ---------------------------------------------------------------------------------------------
# Verdicts: each of the papers' claims next to what we measured


def record_verdict(claim_id: str, *, claim: str, paper: str, ours: str, verdict: str, why: str,
                   notebook: str, profile: str, interval: tuple[float, float] | None = None,
                   trend: str | None = None) -> str:
    """Record a paper's claim, what the paper reported, what we measured and our verdict in
    `verdicts.json` beside the profile's figures (the book tabulates them). Returns a one-line
    summary to print. verdict: one of VERDICTS; why: the criterion and the reason, in words;
    interval: the 95% interval [lo, hi] of the headline number; trend: one of
    `verdicts.TRENDS` (both recorded as null where the criterion has none)."""
    if verdict not in VERDICTS:
        raise ValueError(f"verdict={verdict!r}: expected one of {VERDICTS}")
    if trend is not None and trend not in TRENDS:
        raise ValueError(f"trend={trend!r}: expected one of {TRENDS} or None")
    if not claim_id.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"claim_id={claim_id!r}: use letters, digits, '-' and '_' only")
    entry = {"notebook": notebook, "profile": profile, "claim": claim, "paper": paper,
             "ours": ours, "verdict": verdict, "why": why, "stale": False,
             "interval": _defined_interval(interval), "trend": trend,
             "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}

    def add(verdicts: dict) -> None:
        owner = verdicts.get(claim_id, {}).get("notebook", notebook)
        if owner != notebook:
            raise ValueError(f"claim_id={claim_id!r} already belongs to notebook {owner!r}")
        verdicts[claim_id] = entry

    update_json((_staging() or figures_dir(profile)) / "verdicts.json", add)
    interval = entry["interval"]
    extra = "" if interval is None else f" [95% {_number(interval[0])}, {_number(interval[1])}]"
    extra += "" if trend is None else f" (trend: {trend})"
    return f"{claim}: paper {paper}; ours {ours}{extra} -> {verdict.upper()} ({why})"


def _defined_interval(interval: tuple[float, float] | None) -> list[float] | None:
    """[lo, hi], or None where there is none or a bound is NaN (an interval undefined on some
    resample; JSON has no NaN): the verdict's note says why. An unbounded end (inf) stays."""
    if interval is None:
        return None
    lo, hi = (float(v) for v in interval)
    return None if math.isnan(lo) or math.isnan(hi) else [lo, hi]


def _number(x: float) -> str:
    """A number in 3 significant digits."""
    return f"{x:.3g}"


def verdicts_of_notebook(notebook: str, profile: str) -> dict[str, dict]:
    """The recorded verdicts of `notebook` under `profile`."""
    return {k: v for k, v in verdicts_of(profile).items() if v["notebook"] == notebook}


def verdicts_of(profile: str) -> dict[str, dict]:
    """All recorded verdicts of a profile, by claim id."""
    path = figures_dir(profile) / "verdicts.json"
    return read_json(path)


def mark_stale(notebook: str, profile: str) -> list[str]:
    """Flag the figures and verdicts of `notebook` as stale (its last run failed); returns their ids."""
    marked: list[str] = []

    def flag(manifest: dict) -> None:
        for fig_id, entry in manifest.items():
            if entry["notebook"] == notebook:
                entry["stale"] = True
                marked.append(fig_id)

    for name in ("manifest.json", "verdicts.json"):
        if (figures_dir(profile) / name).exists():
            update_json(figures_dir(profile) / name, flag)
    return marked


def publish(staging: Path, notebook: str, profile: str, run_key: str) -> list[str]:
    """Move a finished run's staged figures and verdicts into the profile's folder.

    The notebook's current entries are marked stale first, so that a kill while files move leaves
    nothing marked fresh that the run did not finish; then every staged file replaces its old
    copy, and the manifest and verdicts are rewritten (one atomic write each) with the run's
    entries only, each carrying `run_key` (what the next run's skip decision checks them
    against). Entries of the notebook that this run did not write are dropped. Returns the
    figure ids published."""
    mark_stale(notebook, profile)
    root = figures_dir(profile)
    staged = {name: read_json(staging / name) for name in ("manifest.json", "verdicts.json")}
    for entry in staged["manifest.json"].values():
        for f in entry["files"]:
            os.replace(staging / f, root / f)
    for name, entries in staged.items():
        def put(live: dict, entries=entries) -> None:
            for key in [k for k, v in live.items() if v.get("notebook") == notebook]:
                del live[key]
            owners = {k: live[k]["notebook"] for k in entries if k in live}
            if owners:
                raise ValueError(f"{notebook}: ids {sorted(owners)} already belong to {owners}")
            live.update({k: v | {"run_key": run_key} for k, v in entries.items()})

        if entries or (root / name).exists():
            update_json(root / name, put)
    return sorted(staged["manifest.json"])


def figures_of(notebook: str, profile: str) -> dict[str, dict]:
    """The manifest entries of `notebook` under `profile`."""
    path = figures_dir(profile) / "manifest.json"
    manifest = read_json(path)
    return {k: v for k, v in manifest.items() if v["notebook"] == notebook}
