"""Run the notebooks with papermill under a profile, then build the Jupyter Book.

`run` executes `notebooks/*.ipynb` into `book/chapters/` with the profile's parameters. A notebook
whose inputs (its file, its parameters, the package's source) are unchanged since its last
successful run under the same profile is skipped. A failing notebook stops the run with its name,
cell and error; its previous executed copy and figures are kept and marked stale, never replaced.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae_repro import __version__
from sae_repro.cache import atomic_path, cache_dir, hash_inputs, write_json
from sae_repro.figures import REPO, figures_dir
from sae_repro.profiles import parameters_for

NOTEBOOKS = REPO / "notebooks"
BOOK = REPO / "book"
EXECUTED = BOOK / "chapters"


class NotebookFailed(RuntimeError):
    """A notebook raised: names the notebook, the cell and the error."""


@dataclass
class RunResult:
    notebook: str
    status: str  # "ran" or "skipped"
    seconds: float


def notebook_paths(only: list[str] | None = None) -> list[Path]:
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    if only:
        names = {p.stem: p for p in paths}
        unknown = [o for o in only if Path(o).stem not in names]
        if unknown:
            raise ValueError(f"unknown notebook(s) {unknown}: expected some of {sorted(names)}")
        paths = [names[Path(o).stem] for o in only]
    return paths


def declared_parameters(nb: Path) -> dict[str, dict]:
    """The names, types and defaults in a notebook's `parameters` cell."""
    import papermill as pm

    return pm.inspect_notebook(str(nb))


def _source_hash() -> str:
    h = hashlib.sha256()
    for p in sorted((REPO / "sae_repro").rglob("*.py")):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _run_key(nb: Path, params: dict[str, Any]) -> str:
    return hash_inputs({"notebook": hashlib.sha256(nb.read_bytes()).hexdigest(),
                        "params": params, "version": __version__, "source": _source_hash()})


def _mark_stale(nb: Path, profile: str) -> None:
    path = figures_dir(profile) / "manifest.json"
    if not path.exists():
        return
    manifest = json.loads(path.read_text())
    for entry in manifest.values():
        if entry["notebook"] == nb.stem:
            entry["stale"] = True
    write_json(path, manifest)


def run_notebook(nb: Path, profile: str, overrides: dict[str, Any] | None = None,
                 force: bool = False) -> RunResult:
    """Execute one notebook under `profile` into book/chapters/, unless unchanged."""
    import papermill as pm

    declared = declared_parameters(nb)
    overrides = overrides or {}
    unknown = sorted(set(overrides) - set(declared))
    if unknown:
        raise ValueError(f"{nb.stem}: unknown parameter(s) {unknown}; it takes {sorted(declared)}")
    params = parameters_for(profile, list(declared)) | overrides
    key = _run_key(nb, params)
    stamp = cache_dir() / "runs" / profile / f"{nb.stem}.json"
    out = EXECUTED / nb.name
    if not force and out.exists() and stamp.exists() and json.loads(stamp.read_text())["key"] == key:
        return RunResult(nb.stem, "skipped", 0.0)
    t0 = time.time()
    with atomic_path(out) as tmp:
        try:
            pm.execute_notebook(str(nb), str(tmp), parameters=params, kernel_name="python3",
                                cwd=str(NOTEBOOKS), progress_bar=False, log_output=False)
        except pm.PapermillExecutionError as e:
            _mark_stale(nb, profile)
            raise NotebookFailed(f"notebook {nb.name} failed in cell {e.exec_count} "
                                 f"({e.ename}: {e.evalue}); previous output kept") from None
    write_json(stamp, {"key": key, "params": params, "seconds": time.time() - t0})
    return RunResult(nb.stem, "ran", time.time() - t0)


def run(profile: str, only: list[str] | None = None, overrides: dict[str, Any] | None = None,
        force: bool = False) -> list[RunResult]:
    results = []
    for nb in notebook_paths(only):
        print(f"[sae-repro] {nb.stem} ({profile}) ...", flush=True)
        r = run_notebook(nb, profile, overrides, force)
        print(f"[sae-repro] {nb.stem}: {r.status} in {r.seconds:.1f}s", flush=True)
        results.append(r)
    return results


def build_book() -> Path:
    """jupyter-book 1.x (Sphinx) build of book/: offline, notebooks already executed."""
    missing = [p.name for p in notebook_paths() if not (EXECUTED / p.name).exists()]
    if missing:
        raise RuntimeError(f"notebooks not executed yet: {missing}; run `sae-repro run` first")
    jb = Path(sys.executable).parent / "jupyter-book"
    cmd = [str(jb), "build", str(BOOK), "--builder", "html", "--warningiserror"]
    subprocess.run(cmd, check=True)
    index = BOOK / "_build" / "html" / "index.html"
    print(f"[sae-repro] book: {index}")
    return index
