"""Where a notebook's time goes: collection, training, plotting, and the rest (analysis).

The package's long work runs inside a `phase`: `activations.collect` ("collection": the model
forward into a store, or reading a cached one), `train.train_sae` ("training"),
`figures.save_figure` ("plotting": rendering and writing the PNG, SVG and inline image). Only the
outermost phase counts, so a collection inside training counts once. Under the pipeline,
$SAE_REPRO_TIMING names a JSON file the totals are written to after each phase; the pipeline
reads it when the notebook ends (`split`) and records the split in `runs.json`, with
"analysis" = the notebook's wall time minus the phases (the analyses, building the plots'
axes, the kernel's start-up). Elsewhere `spent()` holds the totals of this process.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from sae_repro.cache import read_json, write_json

TIMING_ENV = "SAE_REPRO_TIMING"
PHASES = ("collection", "training", "plotting")

F = TypeVar("F", bound=Callable[..., Any])

_spent = {p: 0.0 for p in PHASES}
_depth = 0  # how many phases are open (only the outermost counts)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Count the block's wall time toward `name` (one of PHASES) unless a phase is already open."""
    if name not in PHASES:
        raise ValueError(f"timing.phase: name={name!r}; allowed: {', '.join(PHASES)}")
    global _depth
    outer = _depth == 0
    _depth += 1
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _depth -= 1
        if outer:
            _spent[name] += time.perf_counter() - t0
            path = os.environ.get(TIMING_ENV)
            if path:
                write_json(Path(path), {p: round(s, 2) for p, s in _spent.items()})


def timed(name: str) -> Callable[[F], F]:
    """Decorator: every call of the function runs in `phase(name)`."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            with phase(name):
                return fn(*args, **kwargs)
        return inner  # type: ignore[return-value]
    return wrap


def spent() -> dict[str, float]:
    """Seconds this process has spent in each phase so far."""
    return dict(_spent)


def split(path: Path, total: float) -> dict[str, float]:
    """A notebook's `total` seconds split into the phases read from `path` (written by its
    kernel) and "analysis" (the rest; never below 0). A missing file means no phase ran."""
    phases = {p: float(read_json(path).get(p, 0.0)) if path.exists() else 0.0 for p in PHASES}
    return {**{p: round(s, 1) for p, s in phases.items()},
            "analysis": round(max(0.0, total - sum(phases.values())), 1)}
