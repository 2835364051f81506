"""Compare two runs' figure data: every CSV and every verdict, number by number.

    python tests/compare_figures.py OLD_DIR NEW_DIR [--tol 1e-12]

OLD_DIR and NEW_DIR are figure folders (`figures/`, or `.cache/figures/PROFILE/` of two caches).
Both must hold the same CSVs; numeric columns must agree within `tol` (absolute, or relative to
the larger magnitude), every other column exactly, and `verdicts.json` must give each claim the
same verdict, paper, ours and why. Prints every difference and exits 1 if there is one: the check
that a refactor changed no number (issue 12), and that two fresh runs agree (determinism).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

VERDICT_FIELDS = ("claim", "paper", "ours", "verdict", "why")


def compare_csv(old: Path, new: Path, tol: float) -> list[str]:
    """Differences between two CSVs (shape, columns, then cell by cell)."""
    a, b = pd.read_csv(old), pd.read_csv(new)
    if list(a.columns) != list(b.columns):
        return [f"{old.name}: columns {list(a.columns)} != {list(b.columns)}"]
    if len(a) != len(b):
        return [f"{old.name}: {len(a)} rows != {len(b)} rows"]
    diffs = []
    for col in a.columns:
        x, y = a[col], b[col]
        if pd.api.types.is_numeric_dtype(x) and pd.api.types.is_numeric_dtype(y):
            xv, yv = x.to_numpy(float), y.to_numpy(float)
            both_nan = np.isnan(xv) & np.isnan(yv)
            scale = np.maximum(np.maximum(np.abs(xv), np.abs(yv)), 1.0)
            with np.errstate(invalid="ignore"):  # inf - inf: equal infinities pass by xv == yv
                bad = ~both_nan & ~(np.abs(xv - yv) <= tol * scale) & (xv != yv)
        else:
            bad = (x.astype(str) != y.astype(str)).to_numpy()
        for i in np.flatnonzero(bad)[:5]:
            diffs.append(f"{old.name}: row {i} column {col!r}: {x.iloc[i]!r} != {y.iloc[i]!r}")
        if bad.sum() > 5:
            diffs.append(f"{old.name}: column {col!r}: {int(bad.sum()) - 5} more rows differ")
    return diffs


def compare_verdicts(old: Path, new: Path) -> list[str]:
    a = json.loads(old.read_text()) if old.exists() else {}
    b = json.loads(new.read_text()) if new.exists() else {}
    diffs = [f"verdicts: claim {c} only in {'old' if c in a else 'new'}" for c in sorted(set(a) ^ set(b))]
    for c in sorted(set(a) & set(b)):
        diffs += [f"verdicts: {c}.{f}: {a[c].get(f)!r} != {b[c].get(f)!r}"
                  for f in VERDICT_FIELDS if a[c].get(f) != b[c].get(f)]
    return diffs


def compare_dirs(old: Path, new: Path, tol: float = 1e-12) -> list[str]:
    """Every difference between the figure data of two folders (empty: they agree)."""
    a = {p.name for p in old.glob("*.csv")}
    b = {p.name for p in new.glob("*.csv")}
    diffs = [f"{name}: only in {'old' if name in a else 'new'}" for name in sorted(a ^ b)]
    for name in sorted(a & b):
        diffs += compare_csv(old / name, new / name, tol)
    return diffs + compare_verdicts(old / "verdicts.json", new / "verdicts.json")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--tol", type=float, default=1e-12, help="numeric tolerance (default 1e-12)")
    args = ap.parse_args(argv)
    for d in (args.old, args.new):
        if not d.is_dir():
            ap.error(f"{d} is not a folder")
    diffs = compare_dirs(args.old, args.new, args.tol)
    n = len(list(args.old.glob("*.csv")))
    for d in diffs:
        print(d)
    print(f"{n} CSVs and the verdicts compared (tol {args.tol:g}): "
          + (f"{len(diffs)} differences" if diffs else "identical"))
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
