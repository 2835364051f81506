"""Run the notebooks with papermill under a profile.

`run` executes `notebooks/*.ipynb` into `book/chapters/` with the profile's parameters. Every
parameter is checked (name, type, range) before any kernel starts. A notebook is skipped when its
inputs are unchanged since its last successful run under the same profile: its file, its
parameters, the package's version and source, and the data it read (declared inside the notebook
with `sae_repro.figures.record_input`, rehashed here). A failing notebook stops the run with its
name, cell and error; its previous executed copy and figures are kept and marked stale, never
replaced. Independent notebooks run in parallel processes with `jobs > 1`; a notebook that reads
another's output says so in its metadata (`{"sae_repro": {"after": ["other_notebook"]}}`).

Folders can be moved (tests do) with $SAE_REPRO_NOTEBOOKS, $SAE_REPRO_BOOK, $SAE_REPRO_EXECUTED.
"""

from __future__ import annotations

import ast
import contextlib
import datetime as dt
import functools
import hashlib
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sae_repro import __version__
from sae_repro.cache import atomic_path, cache_dir, hash_inputs, update_json, write_json
from sae_repro.figures import (
    REPO,
    SIDECAR_ENV,
    figures_dir,
    figures_of,
    git_commit,
    git_dirty,
    mark_stale,
    path_hash,
    publish,
    verdicts_of_notebook,
)
from sae_repro.profiles import check_parameter, joint_errors, parameters_for, rule_for, setting_errors
from sae_repro.progress import PROGRESS_ENV, relay
from sae_repro.timing import TIMING_ENV, split


def notebooks_dir() -> Path:
    return Path(os.environ.get("SAE_REPRO_NOTEBOOKS", REPO / "notebooks"))


def book_dir() -> Path:
    return Path(os.environ.get("SAE_REPRO_BOOK", REPO / "book"))


def executed_dir() -> Path:
    return Path(os.environ.get("SAE_REPRO_EXECUTED", book_dir() / "chapters"))


class NotebookFailed(RuntimeError):
    """A notebook raised: names the notebook, the cell and the error."""


class RunInterrupted(RuntimeError):
    """Ctrl-C: says what finished, and that the notebook that was running published nothing."""

    def __init__(self, profile: str, finished: list[str], running: list[str]):
        kept = (f"{', '.join(running)} published nothing (its previous figures are kept as they were; "
                f"the next run reruns it)") if running else "nothing was running"
        done = ", ".join(finished) if finished else "none"
        super().__init__(f"interrupted ({profile}): finished {done}; {kept}")


class ParameterError(ValueError):
    """A parameter is unknown, of the wrong type or out of range; raised before any kernel."""


@dataclass
class RunResult:
    notebook: str
    status: str  # "ran" or "skipped"
    seconds: float
    reason: str = ""  # why it ran, or why it was skipped


@dataclass
class Job:
    """One notebook to run: its validated parameters and the overrides among them."""

    path: Path
    params: dict[str, Any]
    overrides: dict[str, Any]
    after: list[str] = field(default_factory=list)
    source: str = ""  # the hash of the package source it runs (notebook_source), retaken as it starts
    git: dict[str, Any] = field(default_factory=dict)  # commit and dirty, taken then too

    @property
    def name(self) -> str:
        return self.path.stem


# ---------------------------------------------------------------------------------------------
# Notebooks and their parameters


def notebook_paths(only: list[str] | None = None) -> list[Path]:
    paths = sorted(notebooks_dir().glob("*.ipynb"))
    if only:
        names = {p.stem: p for p in paths}
        unknown = [o for o in only if Path(o).stem not in names]
        if unknown:
            raise ValueError(f"unknown notebook(s) {unknown}: expected some of {sorted(names)}")
        paths = [names[Path(o).stem] for o in only]
    return paths


def declared_parameters(nb: Path) -> dict[str, Any]:
    """name -> default value of the parameters in a notebook's `parameters` cell (None where the
    default is not a literal: then any type is accepted)."""
    import papermill as pm

    declared = {}
    for name, info in pm.inspect_notebook(str(nb)).items():
        try:
            declared[name] = ast.literal_eval(info["default"])
        except (ValueError, SyntaxError):
            declared[name] = None
    return declared


def describe_parameter(name: str, default: Any) -> str:
    """`name: type = default (rule)`, for error messages and `sae-repro list`."""
    kind = "any" if default is None else type(default).__name__
    rule = rule_for(name)
    return f"{name}: {kind} = {default!r}" + (f" ({rule.describe()})" if rule else "")


def _after(nb: Path) -> list[str]:
    meta = json.loads(nb.read_text()).get("metadata", {})
    return list(meta.get("sae_repro", {}).get("after", []))


def plan(profile: str, only: list[str] | None = None,
         overrides: dict[str, Any] | None = None) -> list[Job]:
    """The notebooks to run with their parameters, every value checked (no kernel started).

    An override applies to the notebooks that declare it; it must be declared by at least one."""
    overrides = overrides or {}
    if "profile" in overrides:
        raise ParameterError("parameter 'profile' is set with --profile, not -p")
    paths = notebook_paths(only)
    declared = {nb: declared_parameters(nb) for nb in paths}
    known = {k: v for d in declared.values() for k, v in d.items()}
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        allowed = "\n  ".join(describe_parameter(k, v) for k, v in sorted(known.items()))
        names = ", ".join(p.stem for p in paths)
        raise ParameterError(f"unknown parameter(s) {unknown} for notebook(s) {names}; "
                             f"allowed:\n  {allowed}")
    jobs, errors, git = [], [], _git_now()
    for nb, defaults in declared.items():
        job, errs = _make_job(nb, profile, overrides, defaults, notebook_source(nb), git)
        jobs.append(job)
        errors += errs
    if errors:
        raise ParameterError("invalid parameter(s):\n  " + "\n  ".join(errors))
    return jobs


def _make_job(nb: Path, profile: str, overrides: dict[str, Any], defaults: dict[str, Any],
              source: str, git: dict[str, Any]) -> tuple[Job, list[str]]:
    """A notebook's job: the profile's values for what it declares, then its overrides; with the
    errors of every value against the notebook's defaults and the rules."""
    mine = {k: v for k, v in overrides.items() if k in defaults}
    params = parameters_for(profile, list(defaults)) | mine
    errors = []
    for name, value in params.items():
        if name in defaults and (err := check_parameter(name, value, defaults[name])):
            origin = "override" if name in mine else f"profile {profile}"
            errors.append(f"{nb.stem}: {err} ({origin})")
    if not errors:
        errors = [f"{nb.stem}: {e}" for e in joint_errors(params) + setting_errors(params)]
    return Job(nb, params, mine, _after(nb), source, git), errors


# ---------------------------------------------------------------------------------------------
# Deciding whether to run


# Modules that drive the pipeline and the book but that no notebook computes with: editing them
# reruns nothing (a profile's values reach a notebook as its parameters, which are keyed).
_NOT_COMPUTING = ("__main__.py", "book.py", "cli.py", "pipeline.py", "profiles.py", "progress.py")


def source_hash(modules: list[str] | None = None, pkg: Path | None = None) -> str:
    """Hash of the package's code that notebooks compute with: of every computing module, or of
    `modules` only (paths relative to the package, as `notebook_modules` gives them; the hash of
    all of them is the hash of the whole). Docstrings and comment lines do not count (`_code`):
    rewording them changes no number."""
    h = hashlib.sha256()
    pkg = pkg or REPO / "sae_repro"
    for rel in _every_module(pkg):
        if modules is None or rel in modules:
            h.update(rel.encode() + b"\0" + _code((pkg / rel).read_text()))
    return h.hexdigest()[:16]


def _every_module(pkg: Path) -> list[str]:
    """Every computing module of the package, as paths relative to it (in the order hashed)."""
    return [str(p.relative_to(pkg)) for p in sorted(pkg.rglob("*.py")) if p.name not in _NOT_COMPUTING]


def _module_file(dotted: str, pkg: Path) -> str | None:
    """"sae_repro.a.b" -> "a/b.py" (or "a/b/__init__.py"), None if it is no module of ours."""
    parts = dotted.split(".")
    if parts[0] != pkg.name:
        return None
    rel = Path(*parts[1:]) if len(parts) > 1 else Path()
    for cand in (rel.with_suffix(".py") if len(parts) > 1 else None, rel / "__init__.py"):
        if cand is not None and (pkg / cand).is_file():
            return str(cand)
    return None


# IPython magics that run none of our code; any other magic, a shell escape or a dynamic import
# makes a static scan blind, and then the notebook counts as running every module
_HARMLESS_MAGICS = ("matplotlib", "config")


def _blind(tree: ast.AST) -> bool:
    """Could `tree` run package code that its import statements do not name? (a magic other than
    _HARMLESS_MAGICS, a shell escape, exec / eval / __import__ / importlib.import_module / runpy)"""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name, args = node.func.attr, node.args
            if name in ("run_line_magic", "run_cell_magic"):
                if not (args and isinstance(args[0], ast.Constant) and args[0].value in _HARMLESS_MAGICS):
                    return True
            elif name in ("system", "getoutput", "import_module"):
                return True
        if isinstance(node, ast.Name) and node.id in ("exec", "eval", "__import__", "import_module"):
            return True
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(m.split(".")[0] == "runpy" for m in mods):
                return True
    return False


def _import_names(tree: ast.AST, package: str = "") -> list[str]:
    """Every dotted name `tree` imports, anywhere in it (a function-level import counts too, so
    the set is never smaller than what runs), with the packages above each (importing a.b.c
    imports a and a.b first) and `from m import n` also as m.n (n may be a module). package: the
    dotted package a module of ours sits in, which its relative imports start from."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x / from .a import x, relative to `package`
                parts = package.split(".") if package else []
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names += [base] + [f"{base}.{a.name}" for a in node.names]
    return [".".join(d.split(".")[:i]) for d in names for i in range(1, d.count(".") + 2)]


@functools.lru_cache(maxsize=1024)
def _scan(text: str, package: str = "", cell: bool = False) -> tuple[bool, tuple[str, ...]] | None:
    """(blind, imported names) of a module's text or a code cell's (`_blind`, `_import_names`);
    None for a cell that does not parse. A pure function of the text, so cached: a run plans,
    keys and checks every notebook's modules several times."""
    tree = _parse_cell(text) if cell else ast.parse(text)
    return None if tree is None else (_blind(tree), tuple(_import_names(tree, package)))


def _files(names: tuple[str, ...], pkg: Path) -> set[str]:
    """The package's modules (files relative to it) among dotted names."""
    return {f for d in names if (f := _module_file(d, pkg)) is not None}


def _parse_cell(code: str) -> ast.AST | None:
    """A code cell as Python: as written, else with its IPython magics turned into the calls
    IPython makes of them (`get_ipython().run_line_magic(...)`); None if neither parses."""
    try:
        return ast.parse(code)
    except SyntaxError:
        pass
    try:
        from IPython.core.inputtransformer2 import TransformerManager

        return ast.parse(TransformerManager().transform_cell(code))
    except (ImportError, SyntaxError):
        return None


def _code_cells(nb: Path) -> dict[int, tuple[bool, tuple[str, ...]] | None]:
    """The notebook's code cells scanned (`_scan`), by their index among all cells."""
    cells = json.loads(nb.read_text()).get("cells", [])
    return {i: _scan("".join(c.get("source", "")), cell=True) for i, c in enumerate(cells)
            if c.get("cell_type") == "code"}


def blind_cells(nb: Path) -> list[int]:
    """Indices of the notebook's code cells a static scan cannot read (`_parse_cell`, `_blind`):
    with any, the notebook counts as running every module."""
    return [i for i, scanned in _code_cells(nb).items() if scanned is None or scanned[0]]


def notebook_modules(nb: Path, pkg: Path | None = None) -> list[str]:
    """The package's computing modules a notebook's code can run: those its code cells import
    and, closed over, those they import (static and conservative: a cell or module the scan cannot
    read, `blind_cells` / `_blind`, makes it every module). A change elsewhere in the package
    cannot change what the notebook computes, so it does not rerun it."""
    pkg = pkg or REPO / "sae_repro"
    cells = list(_code_cells(nb).values())
    if any(scanned is None or scanned[0] for scanned in cells):
        return sorted(_every_module(pkg))
    todo: set[str] = set().union(*(_files(names, pkg) for _, names in cells))
    seen: set[str] = set()
    while todo:
        rel = todo.pop()
        seen.add(rel)
        parent = ".".join([pkg.name, *Path(rel).parent.parts])  # the package `rel` sits in
        blind, names = _scan((pkg / rel).read_text(), parent)
        if blind:
            return sorted(_every_module(pkg))
        todo |= _files(names, pkg) - seen
    return sorted(m for m in seen if Path(m).name not in _NOT_COMPUTING)


def notebook_source(nb: Path) -> str:
    """`source_hash` of the modules the notebook can run (`notebook_modules`)."""
    return source_hash(notebook_modules(nb))


@functools.lru_cache(maxsize=1024)  # a pure function of the text; every run key hashes it
def _code(source: str) -> bytes:
    """A module's source without its docstrings (by their line ranges, which every Python 3.8+
    parser gives alike) and without comment-only and blank lines."""
    drop: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body:
            first = body[0]
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                drop.update(range(first.lineno, first.end_lineno + 1))
    return "\n".join(line for i, line in enumerate(source.splitlines(), 1)
                     if i not in drop and line.strip() and not line.lstrip().startswith("#")).encode()


def _git_now() -> dict[str, Any]:
    return {"commit": git_commit(), "dirty": git_dirty()}


def notebook_hash(path: Path) -> str:
    """sha256 of a notebook file: what a run is keyed by and its figures record."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _key_parts(job: Job) -> dict[str, Any]:
    return {"notebook": notebook_hash(job.path),
            "params": json.loads(json.dumps(job.params, default=str)),
            "version": __version__, "source": job.source or notebook_source(job.path)}


def _stamp_path(name: str, profile: str) -> Path:
    return cache_dir() / "runs" / profile / f"{name}.json"


def _running_path(name: str, profile: str) -> Path:
    """Exists while a run of the notebook is under way, and after one that was killed."""
    return cache_dir() / "runs" / profile / f"{name}.running"


def _staging_dir(name: str, profile: str) -> Path:
    """Where a run writes its figures until it has finished (beside the live ones: one filesystem)."""
    return figures_dir(profile) / ".staging" / name


def why_run(job: Job, profile: str) -> str | None:
    """Why `job` must run, or None when its last successful run is still current."""
    stamp_path = _stamp_path(job.name, profile)
    if not (executed_dir() / job.path.name).exists():
        return "no executed copy"
    if _running_path(job.name, profile).exists():
        return "its last run did not finish"
    if not stamp_path.exists():
        return "no record of a successful run"
    try:
        stamp = json.loads(stamp_path.read_text())
    except ValueError:
        return f"its run record {stamp_path} is unreadable"
    old, new = stamp.get("parts", {}), _key_parts(job)
    if old.get("notebook") != new["notebook"]:
        return "notebook changed"
    if old.get("params") != new["params"]:
        changed = sorted(k for k in new["params"] | old.get("params", {})
                         if new["params"].get(k) != old.get("params", {}).get(k))
        return f"parameters changed: {', '.join(changed)}"
    # a run recorded before sources were scoped per notebook holds the whole package's hash:
    # unchanged, it still counts (nothing changed at all)
    if old.get("version") != new["version"] or (old.get("source") != new["source"]
                                                 and old.get("source") != source_hash()):
        return "sae_repro package changed"
    for name, entry in stamp.get("inputs", {}).items():
        if entry.get("path") is None:
            continue
        try:
            if path_hash(entry["path"]) != entry["hash"]:
                return f"input {name} changed"
        except FileNotFoundError:
            return f"input {name} missing"
    for fig_id, entry in figures_of(job.name, profile).items():
        if entry.get("stale"):
            return f"figure {fig_id} is stale"
        if entry.get("run_key") != stamp.get("key"):
            return f"figure {fig_id} is not from its last successful run"
        if not all((figures_dir(profile) / f).exists() for f in entry["files"]):
            return f"figure {fig_id} missing"
    for claim_id, entry in verdicts_of_notebook(job.name, profile).items():
        if entry.get("stale") or entry.get("run_key") != stamp.get("key"):
            return f"verdict {claim_id} is not from its last successful run"
    return None


# ---------------------------------------------------------------------------------------------
# Running


def hardware() -> dict[str, Any]:
    """What the run times were measured on."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        mem_gb = None
    gpu = None
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True)
        gpu = ", ".join(out.stdout.split("\n")).strip(", ") or None
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory_gb": mem_gb, "gpu": gpu,
            "platform": platform.platform(), "python": platform.python_version()}


def _failure_message(job: Job, err: Exception, failed_copy: Path, had_figures: bool = True) -> str:
    import papermill as pm

    if isinstance(err, pm.PapermillExecutionError):
        cells = json.loads(job.path.read_text())["cells"]
        src = err.source.strip()
        index = next((i + 1 for i, c in enumerate(cells) if "".join(c["source"]).strip() == src),
                     None)
        where = f"cell {index}" if index else f"cell with execution count {err.exec_count}"
        first = _raising_line(err.traceback) or (src.splitlines()[0] if src else "")
        what = f"{err.ename}: {err.evalue}"
    else:
        where, first, what = "kernel", "", f"{type(err).__name__}: {err}"
    msg = f"notebook {job.name} failed in {where} ({what})"
    if first:
        msg += f"\n  {where}: {first}"
    kept = ("previous figures kept and marked stale" if had_figures else "no previous figures")
    return msg + f"\n  {kept}; failed copy: {failed_copy}"


def _raising_line(traceback: list[str]) -> str:
    """The cell's line that raised, from IPython's traceback ("----> 5 x = f()" in the first frame,
    the cell's own), as "line 5: x = f()"; empty if it is not there."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(traceback or []))
    m = re.search(r"^-+> ?(\d+) (.*)$", text, flags=re.M)
    return f"line {m.group(1)}: {m.group(2).strip()}" if m else ""


def _record_run(profile: str, name: str, info: dict[str, Any], keep: bool = False) -> None:
    """runs.json beside the profile's figures: what ran when, how long, on what, and its status.
    With `keep`, fields of the previous record that `info` does not set are kept."""
    def put(runs: dict) -> None:
        runs[name] = (runs.get(name, {}) if keep else {}) | info

    update_json(figures_dir(profile) / "runs.json", put)


def _as_now(job: Job) -> Job:
    """The job keyed by the source its notebook runs as it starts, not as it was planned (a long
    run's later notebooks start after edits made since)."""
    return replace(job, source=notebook_source(job.path))


def _code_digest(nb: Path) -> str:
    """The notebook's bytes and the code of the modules it can run, as they are now: compared
    before and after a run, so that a run during which either was edited publishes nothing."""
    return f"{notebook_hash(nb)}+{notebook_source(nb)}"


def execute(job: Job, profile: str, force: bool = False) -> RunResult:
    """Run one planned notebook into the executed folder, unless its inputs are unchanged."""
    job = _as_now(job)
    reason = "forced" if force else why_run(job, profile)
    if reason is None:
        return RunResult(job.name, "skipped", 0.0, "inputs unchanged")
    return _execute(job, profile, reason)


def _execute(job: Job, profile: str, reason: str) -> RunResult:
    """Run the notebook into the executed folder; its figures and verdicts are staged and published
    only when it finishes, so an interrupted or killed run changes nothing that is published (and
    leaves a marker that makes the next run rerun it)."""
    runs = cache_dir() / "runs" / profile
    running, staging = _running_path(job.name, profile), _staging_dir(job.name, profile)
    _clean_leftovers(job, staging)
    parts, code_at_start = _key_parts(job), _code_digest(job.path)
    sidecar = _write_sidecar(job, runs, parts, staging)
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    write_json(running, {"started": started, "params": job.params})
    load = round(os.getloadavg()[0], 1)  # other work on the machine slows this run down
    t0 = time.time()
    try:
        timing = runs / f"{job.name}.timing.json"
        with _kernel_env(sidecar, runs / f"{job.name}.progress", timing, job.name):
            _run_papermill(job, profile, runs, started)
        if _code_digest(job.path) != code_at_start:
            raise NotebookFailed(f"{job.name}: its notebook or the package code it runs was edited while it "
                                 f"ran, so its figures may come from either version: nothing published, "
                                 f"run it again")
        key = hash_inputs(parts)
        publish(staging, job.name, profile, key)
        seconds = time.time() - t0
        phases = split(timing, seconds)
        inputs = json.loads(sidecar.read_text())["inputs"]
        write_json(_stamp_path(job.name, profile), {"key": key, "parts": parts, "inputs": inputs,
                                                    "seconds": seconds})
        running.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _record_run(profile, job.name, {"status": "ok", "started": started, "seconds": round(seconds, 1),
                                    "split": phases, "load_at_start": load,
                                    "params": job.params, "hardware": hardware(), "git": job.git,
                                    "inputs": {k: v["hash"] for k, v in inputs.items()}})
    return RunResult(job.name, "ran", seconds, reason)


def _write_sidecar(job: Job, runs: Path, parts: dict[str, Any], staging: Path) -> Path:
    """What the kernel reads from the pipeline: overrides, git state, where to stage, inputs."""
    sidecar = runs / f"{job.name}.sidecar.json"
    write_json(sidecar, {"overrides": job.overrides, "git": job.git or _git_now(), "staging": str(staging),
                         "inputs": {
        "notebook": {"path": str(job.path.resolve()), "hash": parts["notebook"]},
        "sae_repro": {"path": None, "hash": f"{parts['version']}+{parts['source']}"}}})
    return sidecar


def _run_papermill(job: Job, profile: str, runs: Path, started: str) -> None:
    """Execute into the executed copy (replaced only on success); a failure is recorded, its old
    figures marked stale, and raised as NotebookFailed; Ctrl-C is recorded and re-raised."""
    import papermill as pm

    with atomic_path(executed_dir() / job.path.name) as tmp:
        try:
            with _stderr_to(runs / f"{job.name}.kernel.log"):  # the kernel's own chatter
                pm.execute_notebook(str(job.path), str(tmp), parameters=job.params,
                                    kernel_name="python3", cwd=str(job.path.parent),
                                    progress_bar=False, log_output=False)
        except Exception as e:  # a cell raised, the kernel died or timed out
            if getattr(e, "ename", None) == "KeyboardInterrupt":  # Ctrl-C reached the kernel first
                raise KeyboardInterrupt from None
            failed = runs / f"{job.name}.failed.ipynb"
            if tmp.exists():
                shutil.copyfile(tmp, failed)
            stale = mark_stale(job.name, profile)
            _record_run(profile, job.name, {"status": "failed", "failed_at": started,
                                            "error": type(e).__name__, "stale": stale}, keep=True)
            _running_path(job.name, profile).unlink(missing_ok=True)
            raise NotebookFailed(_failure_message(job, e, failed, bool(stale))) from None
        except BaseException:  # Ctrl-C: nothing was published; the marker reruns it next time
            _record_run(profile, job.name, {"status": "interrupted", "interrupted_at": started}, keep=True)
            raise


@contextlib.contextmanager
def _kernel_env(sidecar: Path, progress: Path, timing: Path, name: str):
    """The kernel's environment (it inherits ours) while it runs, and the relay of its progress."""
    old = {k: os.environ.get(k) for k in (SIDECAR_ENV, PROGRESS_ENV, TIMING_ENV)}
    progress.unlink(missing_ok=True)
    timing.unlink(missing_ok=True)
    os.environ[SIDECAR_ENV] = str(sidecar)
    os.environ[PROGRESS_ENV] = str(progress)  # its phases, printed by the relay
    os.environ[TIMING_ENV] = str(timing)  # seconds per phase (sae_repro.timing)
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would fill the book's pages
    stop = threading.Event()
    relayer = threading.Thread(target=relay, args=(progress, f"  {name}: ", stop), daemon=True)
    relayer.start()
    try:
        yield
    finally:
        stop.set()
        relayer.join()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _stderr_to(log: Path):
    """Send this process's stderr, and so the kernel's (it inherits it), to `log` meanwhile: the
    kernel's warnings ("running over TCP without encryption") and its traceback after a Ctrl-C
    belong in a log, not on the console; errors of the notebook reach us through papermill."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with open(log, "w") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _clean_leftovers(job: Job, staging: Path) -> None:
    """What a killed run of this notebook left behind: its staged figures and the temporary
    executed copy (`atomic_path` removes both unless the process was killed outright)."""
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for tmp in executed_dir().glob(f".tmp-*-{job.path.name}"):
        tmp.unlink(missing_ok=True)


def run_notebook(nb: Path, profile: str, overrides: dict[str, Any] | None = None,
                 force: bool = False) -> RunResult:
    """Execute one notebook under `profile` (parameters checked first), unless unchanged."""
    overrides = overrides or {}
    declared = declared_parameters(nb)
    unknown = sorted(set(overrides) - set(declared))
    if unknown:
        allowed = "\n  ".join(describe_parameter(k, v) for k, v in declared.items())
        raise ParameterError(f"{nb.stem}: unknown parameter(s) {unknown}; it takes:\n  {allowed}")
    job, errors = _make_job(nb, profile, overrides, declared, notebook_source(nb), _git_now())
    if errors:
        raise ParameterError("invalid parameter(s):\n  " + "\n  ".join(errors))
    return execute(job, profile, force)


def _report(r: RunResult, profile: str) -> None:
    detail = f"ran in {r.seconds:.1f}s ({r.reason})" if r.status == "ran" else f"skipped ({r.reason})"
    print(f"[sae-repro] {r.notebook} ({profile}): {detail}", flush=True)


def _ordered(jobs: list[Job]) -> list[Job]:
    """The jobs in the order given (`--only`'s, else by name), each moved only as far as it must be
    to come after the selected notebooks it depends on."""
    names = {j.name for j in jobs}
    done: list[Job] = []
    pending = list(jobs)
    while pending:
        finished = {d.name for d in done}
        ready = next((j for j in pending if all(a in finished or a not in names for a in j.after)), None)
        if ready is None:
            raise ValueError(f"notebooks depend on each other in a cycle: {[j.name for j in pending]}")
        done.append(ready)
        pending.remove(ready)
    return done


def pending(profile: str, only: list[str] | None = None,
            overrides: dict[str, Any] | None = None) -> list[tuple[str, str | None]]:
    """(notebook, why it would run, or None if its figures are current) for the notebooks `run`
    would take, in its order: what `sae-repro run --dry-run` prints. Starts no kernel."""
    return [(job.name, why_run(job, profile)) for job in _ordered(plan(profile, only, overrides))]


def run(profile: str, only: list[str] | None = None, overrides: dict[str, Any] | None = None,
        force: bool = False, jobs: int = 1) -> list[RunResult]:
    """Run the selected notebooks (all by default); `jobs` > 1 runs independent ones in parallel
    processes. Raises ParameterError before any kernel starts, NotebookFailed on the first
    failure (after letting notebooks already running finish)."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ParameterError(f"jobs={jobs!r}: must be a whole number >= 1")
    planned = _ordered(plan(profile, only, overrides))
    if jobs == 1 or len(planned) <= 1:
        results: list[RunResult] = []
        try:
            for job in planned:
                print(f"[sae-repro] {job.name} ({profile}) ...", flush=True)
                results.append(execute(job, profile, force))
                _report(results[-1], profile)
        except KeyboardInterrupt:
            running = [planned[len(results)].name] if len(results) < len(planned) else []
            raise RunInterrupted(profile, [r.notebook for r in results], running) from None
        return results
    try:
        return _run_parallel(planned, profile, force, jobs)
    except KeyboardInterrupt:
        raise RunInterrupted(profile, [], [j.name for j in planned]) from None


def _run_parallel(planned: list[Job], profile: str, force: bool, jobs: int) -> list[RunResult]:
    names = {j.name for j in planned}
    pending, running = list(planned), {}  # type: list[Job], dict[Future, Job]
    done: dict[str, RunResult] = {}
    failure: NotebookFailed | None = None
    ctx = multiprocessing.get_context("spawn")  # a clean interpreter per worker, like a kernel
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        while pending or running:
            if failure is None:
                for job in [j for j in pending if all(a in done or a not in names for a in j.after)]:
                    pending.remove(job)
                    job = _as_now(job)
                    # decided here, once the notebooks it reads from have finished
                    reason = "forced" if force else why_run(job, profile)
                    if reason is None:
                        done[job.name] = RunResult(job.name, "skipped", 0.0, "inputs unchanged")
                        _report(done[job.name], profile)
                        continue
                    print(f"[sae-repro] {job.name} ({profile}) ...", flush=True)
                    running[pool.submit(_execute, job, profile, reason)] = job
            else:
                pending = []  # start nothing new after a failure
            if not running:
                if pending and failure is None:
                    continue  # skipped jobs may have unblocked others
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                job = running.pop(fut)
                try:
                    done[job.name] = fut.result()
                    _report(done[job.name], profile)
                except NotebookFailed as e:
                    failure = failure or e
    if failure is not None:
        raise failure
    return [done[j.name] for j in planned]
