"""Save a figure people can cite: PNG + SVG + the CSV of the plotted data + a manifest entry.

The committed `figures/` hold the `default` profile's figures; other profiles write to
`.cache/figures/<profile>/` so a CI run never overwrites what the book cites.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd

from sae_repro import __version__
from sae_repro.cache import atomic_path, cache_dir, write_json

REPO = Path(__file__).resolve().parent.parent


def figures_dir(profile: str) -> Path:
    env = os.environ.get("SAE_REPRO_FIGURES")
    root = Path(env) if env else (REPO / "figures" if profile == "default"
                                  else cache_dir() / "figures" / profile)
    root.mkdir(parents=True, exist_ok=True)
    return root


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def save_figure(fig, data: pd.DataFrame, fig_id: str, *, notebook: str, profile: str,
                params: dict[str, Any], caption: str = "", inputs: dict[str, str] | None = None) -> Path:
    """Write `<fig_id>.png/.svg/.csv` and record it in `manifest.json`; returns the PNG path."""
    if not fig_id.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"fig_id={fig_id!r}: use letters, digits, '-' and '_' only")
    root = figures_dir(profile)
    for ext in ("png", "svg"):
        with atomic_path(root / f"{fig_id}.{ext}") as tmp:
            fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight",
                        metadata={"Date": None} if ext == "svg" else None)
    with atomic_path(root / f"{fig_id}.csv") as tmp:
        data.to_csv(tmp, index=False)
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest[fig_id] = {
        "notebook": notebook, "profile": profile, "params": params, "caption": caption,
        "package_version": __version__, "git_commit": git_commit(), "inputs": inputs or {},
        "files": [f"{fig_id}.png", f"{fig_id}.svg", f"{fig_id}.csv"],
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "stale": False,
    }
    write_json(manifest_path, manifest)
    return root / f"{fig_id}.png"
