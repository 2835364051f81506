"""Zipf fit of an SAE's feature-density curve (Ayonrinde 2024, Mutual Choice paper, Fig. 3).

The paper sorts feature densities in decreasing order and finds that density against rank is a
straight line in log-log space: "fits a Zipf curve with R^2 = 0.982; the middle part (features
100-20,000) fits with R^2 = 0.996". We fit

    log(density_r) = log_c - exponent * log(r),    r = 1..n  (rank 1 = densest latent)

by ordinary least squares in log-log space, on the latents that fired at least once. Dead
latents (density 0) have no logarithm: they are excluded from the fit and counted (`n_dead`);
since they sort last, the live latents keep ranks 1..n_live.

The standard errors are the textbook OLS ones, which assume independent residuals. Residuals
of a *sorted* curve are strongly correlated (neighbouring order statistics), so these errors
understate the real uncertainty: on simulated Zipf data the exponent misses by ~10 SEs (still
~0.005 in absolute terms). Use them to compare fits of similar size, not as confidence intervals.

R^2 is always 1 - SS_res / SS_tot in log-log space, computed for *one* fitted line over two
sets of ranks: all live ranks (`r2_all`) and the middle ranks (`r2_middle`). Which line is
used is `fit_on`. The paper does not say whether its middle R^2 comes from a separate fit
*(our reading: it does)*, so its two numbers correspond to `fit_zipf(d).r2_all` and
`fit_zipf(d, fit_on="middle").r2_middle`.

The middle range is 1-based and inclusive, and is clipped to the live ranks 1..n_live (a
16k-latent SAE has no rank 20,000); `ZipfFit.middle` holds the clipped range. Clipping keeps
the tail cut-off the paper's range excluded, so `proportional_middle` scales the paper's range
to another width instead (as the same share of the ranks), and `supported_ranks` counts the
ranks whose density rests on at least MIN_FIRINGS firings: `fit_zipf(max_rank=)` fits only
those, since a density seen a few times is mostly counting noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from scipy import stats
from torch import Tensor

from sae_repro.intervals import context_bootstrap

FIT_ON = ("all", "middle")
PAPER_MIDDLE = (100, 20_000)  # the paper's middle ranks
# the width those ranks are of: GPT-2 small's d_model 768 x 32 *(our reading: the paper's figure
# does not state the width; its curves reach past rank 20,000)*
PAPER_WIDTH = 24_576
MIN_FIRINGS = 30  # a ranked density must rest on at least this many firings


@dataclass
class ZipfFit:
    """density(rank) ~= exp(log_c) * rank^-exponent, with standard errors from the OLS fit."""

    exponent: float
    exponent_se: float
    log_c: float  # natural log of the fitted density at rank 1
    log_c_se: float
    r2_all: float  # log-log R^2 of the fitted line over all live ranks
    r2_middle: float  # ... over the (clipped) middle ranks; nan if fewer than 3 of them
    middle: tuple[int, int]  # clipped middle range, 1-based inclusive
    n_fitted: int  # number of (rank, density) points the line was fitted on
    n_dead: int  # latents with density 0, excluded from the fit
    n_latents: int
    fit_on: str
    n_cut: int = 0  # live latents past max_rank, left out of every R^2 and fit

    def predict(self, rank: Tensor | np.ndarray | float) -> np.ndarray:
        """Fitted density at 1-based `rank` (any shape)."""
        rank = np.asarray(rank, dtype=np.float64)
        return np.exp(self.log_c - self.exponent * np.log(rank))


def _as_numpy(densities: Tensor | np.ndarray) -> np.ndarray:
    """Validated float64 copy of a 1-d density vector."""
    if isinstance(densities, Tensor):
        densities = densities.detach().cpu().double().numpy()
    d = np.asarray(densities, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"densities: expected a non-empty 1-d array [n_latents], got shape {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError(f"densities: {int((~np.isfinite(d)).sum())} values are NaN or inf; all must be finite")
    if (d < 0).any():
        raise ValueError(f"densities: min value {d.min()} is negative; densities must be >= 0")
    return d


def _clip_middle(middle: tuple[int, int], n_live: int) -> tuple[int, int]:
    lo, hi = middle
    if not (isinstance(lo, (int, np.integer)) and isinstance(hi, (int, np.integer)) and 1 <= lo < hi):
        raise ValueError(f"middle={middle!r}: expected two integer ranks 1 <= lo < hi (1-based, inclusive)")
    return int(min(lo, n_live)), int(min(hi, n_live))


def _r2(y: np.ndarray, y_hat: np.ndarray) -> float:
    if y.size < 3:
        return float("nan")
    ss_tot = ((y - y.mean()) ** 2).sum()
    return float(1 - ((y - y_hat) ** 2).sum() / ss_tot) if ss_tot > 0 else float("nan")


def fit_zipf(
    densities: Tensor | np.ndarray,
    *,
    middle: tuple[int, int] = PAPER_MIDDLE,
    fit_on: Literal["all", "middle"] = "all",
    max_rank: int | None = None,
) -> ZipfFit:
    """Fit a Zipf law to a feature-density curve.  densities: [n_latents], any order, >= 0.

    Counts work as well as fractions (only log_c changes). max_rank: keep only the densest
    max_rank live latents (e.g. `supported_ranks`); the middle range is clipped to them.
    """
    if fit_on not in FIT_ON:
        raise ValueError(f"fit_on={fit_on!r}: expected one of {FIT_ON}")
    d = _as_numpy(densities)
    live = np.sort(d[d > 0])[::-1]  # dead latents sort last, so live ranks are 1..n_live
    n_cut = 0
    if max_rank is not None:
        if int(max_rank) < 1:
            raise ValueError(f"max_rank={max_rank!r}: expected a positive rank or None")
        n_cut, live = max(0, live.size - int(max_rank)), live[:int(max_rank)]
    n_live = live.size
    if n_live < 3:
        raise ValueError(f"densities: only {n_live} of {d.size} latents have density > 0; "
                         f"a Zipf fit needs at least 3")
    lo, hi = _clip_middle(middle, n_live)
    log_r, log_d = np.log(np.arange(1, n_live + 1, dtype=np.float64)), np.log(live)
    mid = slice(lo - 1, hi)  # ranks lo..hi inclusive
    if fit_on == "middle" and log_r[mid].size < 3:
        raise ValueError(f"middle={middle!r}: clipped to ({lo}, {hi}) by the {n_live} live latents, "
                         f"fewer than 3 ranks to fit on; lower middle or use fit_on='all'")
    sel = mid if fit_on == "middle" else slice(None)
    fit = stats.linregress(log_r[sel], log_d[sel])
    pred = fit.intercept + fit.slope * log_r
    return ZipfFit(
        exponent=float(-fit.slope), exponent_se=float(fit.stderr),
        log_c=float(fit.intercept), log_c_se=float(fit.intercept_stderr),
        r2_all=_r2(log_d, pred), r2_middle=_r2(log_d[mid], pred[mid]), middle=(lo, hi),
        n_fitted=int(log_r[sel].size), n_dead=int(d.size - n_live - n_cut), n_latents=int(d.size),
        fit_on=fit_on, n_cut=n_cut,
    )


def proportional_middle(n_latents: int, middle: tuple[int, int] = PAPER_MIDDLE,
                        paper_width: int = PAPER_WIDTH) -> tuple[int, int]:
    """The paper's middle ranks as the same shares of the ranks at `n_latents` (1-based,
    inclusive): (100, 20,000) of 24,576 -> (19, 3,750) of 4,608."""
    lo, hi = _clip_middle(middle, paper_width)
    if n_latents < 1:
        raise ValueError(f"n_latents={n_latents!r}: expected a positive width")
    return max(1, round(lo * n_latents / paper_width)), max(2, round(hi * n_latents / paper_width))


def supported_ranks(densities: Tensor | np.ndarray, n_tokens: int, min_firings: int = MIN_FIRINGS) -> int:
    """How many latents fired at least `min_firings` times on the `n_tokens` tokens their
    densities (fractions of tokens) were measured on: the ranks a density curve can rest on."""
    d = _as_numpy(densities)
    if n_tokens < 1:
        raise ValueError(f"n_tokens={n_tokens!r}: expected a positive number of tokens")
    return int((np.rint(d * n_tokens) >= min_firings).sum())


def zipf_curve_frame(densities: Tensor | np.ndarray, fit: ZipfFit) -> pd.DataFrame:
    """The sorted curve and its fit, one row per latent: rank, density, fitted, in_middle.

    Dead latents are kept (density 0, at the highest ranks); drop them before a log-log plot.
    """
    d = _as_numpy(densities)
    if d.size != fit.n_latents:
        raise ValueError(f"densities: {d.size} latents, but fit was made on {fit.n_latents}")
    rank = np.arange(1, d.size + 1)
    return pd.DataFrame({
        "rank": rank,
        "density": np.sort(d)[::-1],
        "fitted": fit.predict(rank),
        "in_middle": (rank >= fit.middle[0]) & (rank <= fit.middle[1]),
    })


def _verdict_r2s(firings: np.ndarray, tokens: np.ndarray, min_firings: int) -> tuple[float, float]:
    """The verdict's two R^2 from per-context fire counts [c, L] and token counts [c]: over the
    supported ranks, and on the proportional middle (fitted there); NaN where too few ranks."""
    n = float(tokens.sum())
    d = firings.sum(0) / n
    n_ok = supported_ranks(d, int(n), min_firings)
    middle = proportional_middle(len(d))
    try:
        fit = fit_zipf(d, middle=middle, max_rank=n_ok)
    except ValueError:  # fewer than 3 supported ranks
        return float("nan"), float("nan")
    if fit.middle[1] - fit.middle[0] + 1 < 3:
        return fit.r2_all, float("nan")
    return fit.r2_all, fit_zipf(d, middle=middle, fit_on="middle", max_rank=n_ok).r2_middle


def zipf_bootstrap(firings: np.ndarray, tokens: np.ndarray, *, min_firings: int = MIN_FIRINGS,
                   seed: int = 0) -> dict[str, tuple[float, tuple[float, float]]]:
    """The Zipf verdict's numbers with 95% intervals over contexts.

    firings: [n_contexts, n_latents] fire counts per context, tokens: [n_contexts] tokens per
    context (`train.evaluate(..., context=)`). The densities, the supported ranks
    (>= min_firings firings) and both fits are recomputed on every resample of the contexts.
    -> {"r2_supported": (value, (lo, hi)), "r2_middle": (value, (lo, hi))}: the R^2 over the
    supported ranks and on the paper's middle as the same share of ranks (fitted there)."""
    f, t = np.asarray(firings, dtype=np.float64), np.asarray(tokens, dtype=np.float64).reshape(-1)
    if f.ndim != 2 or len(f) != len(t):
        raise ValueError(f"zipf_bootstrap: firings must be [n_contexts, n_latents] and tokens [n_contexts]; "
                         f"got {f.shape} and {t.shape}")
    values = _verdict_r2s(f, t, min_firings)
    return {name: (values[i], context_bootstrap(lambda a, b, i=i: _verdict_r2s(a, b, min_firings)[i], f, t,
                                                seed=seed))
            for i, name in enumerate(("r2_supported", "r2_middle"))}
