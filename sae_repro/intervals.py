"""95% intervals for the numbers verdicts rest on, and the trend of a number up a budget ladder.

- `context_bootstrap`: a statistic of held-out data, resampling whole contexts (tokens of one
  context are not independent) with `scipy.stats.bootstrap`, percentile method. The statistic
  takes per-context sums (`per_context`), so a resample costs a sum over contexts, not tokens:
  FVU = sum ||e||^2 / sum ||x - mean||^2 is a ratio of such sums.
- `r2_bootstrap`: a statistic of the held-out R^2 of several fixed predictions (the Dark Matter
  paper's vector and norm scores, FVU as 1 - R^2), by context bootstrap.
- `poisson_interval`: exact (Garwood) interval of a count, e.g. the dead latents of an SAE;
  `rate_ratio_interval`: exact interval of the ratio of two such counts' rates.
- `seed_interval`: Student-t interval of a mean over training seeds (>= 2 seeds);
  `difference_interval`: Welch's interval of the difference of two such means.
- `side`: where an interval lies against a threshold: a criterion calls a result whose interval
  straddles its threshold "inconclusive".
- `trend`: a number measured at several training budgets, fitted against log10(budget); flat
  when the slope's 95% interval holds 0, else toward or away from the paper's value, with the
  budget at which the fitted line would reach it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import stats

CONFIDENCE = 0.95
N_RESAMPLES = 2000


def _interval(lo: float, hi: float) -> tuple[float, float]:
    return float(lo), float(hi)


def per_context(values: np.ndarray | torch.Tensor, context: np.ndarray | torch.Tensor) -> np.ndarray:
    """Sum per-token values [n_tokens, ...] over each context -> [n_contexts, ...] (float64), the
    contexts numbered 0..n_contexts-1 in order of first appearance."""
    v = np.asarray(values.double() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    c = np.asarray(context).reshape(-1)
    if v.shape[0] != c.shape[0]:
        raise ValueError(f"per_context: values have {v.shape[0]} tokens, context has {c.shape[0]}")
    codes, n_contexts = context_codes(c)
    out = np.zeros((n_contexts,) + v.shape[1:])
    np.add.at(out, codes, v)
    return out


def context_codes(context: np.ndarray | torch.Tensor) -> tuple[np.ndarray, int]:
    """Each token's context number [n_tokens] (int64, 0..n_contexts-1 in order of first
    appearance: the rows of `per_context`) and n_contexts."""
    codes, uniques = pd.factorize(np.asarray(context).reshape(-1))
    return codes.astype(np.int64), len(uniques)


def context_bootstrap(statistic: Callable[..., float], *sums: np.ndarray, seed: int = 0,
                      n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """95% percentile interval of statistic(*sums), the contexts resampled with replacement.

    sums: arrays [n_contexts, ...] (from `per_context`), resampled together (the same contexts in
    each). Needs >= 2 contexts; a statistic that is NaN on a resample makes the interval NaN."""
    if not sums:
        raise ValueError("context_bootstrap: give at least one array of per-context sums")
    n = {np.shape(s)[0] for s in sums}
    if len(n) != 1:
        raise ValueError(f"context_bootstrap: the arrays have different numbers of contexts {sorted(n)}")
    if n.pop() < 2:
        raise ValueError("context_bootstrap: needs at least 2 contexts")
    arrays = [np.asarray(s, dtype=np.float64) for s in sums]
    # resample context indices (scipy resamples along one axis of 1-d data; sums may be [c, d])
    res = stats.bootstrap((np.arange(len(arrays[0])),), lambda i: statistic(*(a[i] for a in arrays)),
                          vectorized=False, n_resamples=n_resamples, confidence_level=confidence,
                          method="percentile", rng=np.random.default_rng(seed))
    return _interval(res.confidence_interval.low, res.confidence_interval.high)


def r2_bootstrap(pairs: Sequence[tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]],
                 context: np.ndarray | torch.Tensor, statistic: Callable[[np.ndarray], float] = np.median, *,
                 per_dim: bool = False, seed: int = 0, n_resamples: int = N_RESAMPLES,
                 confidence: float = CONFIDENCE) -> tuple[float, tuple[float, float]]:
    """A statistic of the R^2 of several predictions on the same held-out tokens, with its
    context-bootstrap interval (the fits stay fixed; the scored tokens are resampled by context).

    pairs: (y, y_hat) per prediction, each [n_tokens] or [n_tokens, d] on the tokens `context`
    [n_tokens] numbers; R^2 = 1 - sum (y - y_hat)^2 / sum (y - mean y)^2, pooled over dimensions
    or, with per_dim, per dimension and averaged (the Dark Matter paper's vector score; a
    dimension without variance scores 1 if predicted exactly, else 0, as in
    `decomposition.r2_per_dim`). statistic: [n_pairs] R^2 -> the number (default: the median;
    `lambda r: r[0]` for one prediction; FVU = 1 - R^2 pooled). -> (value, (lo, hi))."""
    count = per_context(np.ones(len(np.asarray(context).reshape(-1))), context)
    sums = []
    for y, y_hat in pairs:
        y, y_hat = (np.asarray(t.double() if isinstance(t, torch.Tensor) else t, dtype=np.float64)
                    for t in (y, y_hat))
        if y.shape != y_hat.shape:
            raise ValueError(f"r2_bootstrap: y {y.shape} and y_hat {y_hat.shape} differ in shape")
        y, y_hat = y.reshape(len(y), -1), y_hat.reshape(len(y_hat), -1)
        sums += [per_context((y - y_hat) ** 2, context), per_context(y, context), per_context(y**2, context)]

    def r2s(cnt: np.ndarray, *s: np.ndarray) -> np.ndarray:
        n, out = cnt.sum(), []
        for res, y1, y2 in zip(s[0::3], s[1::3], s[2::3]):
            ss_res, ss_tot = res.sum(0), y2.sum(0) - y1.sum(0) ** 2 / n
            if per_dim:
                flat = ss_tot <= 1e-12 * max(float(y2.sum()), 1e-300)
                r2 = np.where(flat, (ss_res == 0).astype(float), 1 - ss_res / np.where(flat, 1.0, ss_tot))
                out.append(r2.mean())
            else:
                out.append(1 - ss_res.sum() / ss_tot.sum())
        return np.asarray(out)

    value = float(statistic(r2s(count, *sums)))
    return value, context_bootstrap(lambda *a: float(statistic(r2s(*a))), count, *sums, seed=seed,
                                    n_resamples=n_resamples, confidence=confidence)



def spearman_bootstrap(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor,
                       context: np.ndarray | torch.Tensor, *, seed: int = 0, n_resamples: int = N_RESAMPLES,
                       confidence: float = CONFIDENCE) -> tuple[float, tuple[float, float]]:
    """Spearman's rho of x and y [n_tokens] with its context-bootstrap interval.

    rho is the Pearson correlation of the ranks (ties averaged), exactly `scipy.stats.spearmanr`;
    a resample keeps the ranks of the full sample (it does not re-rank), so each resample is five
    per-context sums and the bootstrap costs no sort. -> (rho, (lo, hi))."""
    rx, ry = (stats.rankdata(np.asarray(v.double() if isinstance(v, torch.Tensor) else v, dtype=np.float64))
              for v in (x, y))
    if rx.shape != ry.shape or rx.ndim != 1:
        raise ValueError(f"spearman_bootstrap: x and y must be [n_tokens], got {rx.shape} and {ry.shape}")
    count = per_context(np.ones(len(rx)), context)
    sums = [per_context(v, context) for v in (rx, ry, rx * rx, ry * ry, rx * ry)]

    def rho(n: np.ndarray, sx: np.ndarray, sy: np.ndarray, sxx: np.ndarray, syy: np.ndarray, sxy: np.ndarray) -> float:
        n, sx, sy = n.sum(), sx.sum(), sy.sum()
        cov, vx, vy = sxy.sum() - sx * sy / n, sxx.sum() - sx * sx / n, syy.sum() - sy * sy / n
        return float(cov / np.sqrt(vx * vy)) if vx > 0 and vy > 0 else float("nan")

    value = rho(count, *sums)
    return value, context_bootstrap(rho, count, *sums, seed=seed, n_resamples=n_resamples, confidence=confidence)

def poisson_interval(count: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Exact (Garwood) interval of the mean of a Poisson count: [0, 3.69] for 0, [0.025, 5.57] for 1."""
    if isinstance(count, bool) or int(count) != count or count < 0:
        raise ValueError(f"poisson_interval: count must be a whole number >= 0, got {count!r}")
    a = 1 - confidence
    lo = 0.0 if count == 0 else stats.chi2.ppf(a / 2, 2 * count) / 2
    return _interval(lo, stats.chi2.ppf(1 - a / 2, 2 * count + 2) / 2)


def rate_ratio_interval(a: int, b: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Exact interval of the ratio of two Poisson rates seen with the same exposure (e.g. dead
    latents of two SAEs of one width on the same tokens), from counts a and b: given a + b, a is
    binomial with p = ratio / (1 + ratio); the Clopper-Pearson interval of p, mapped to the ratio.
    (0, inf) when both are 0."""
    for name, v in (("a", a), ("b", b)):
        if isinstance(v, bool) or int(v) != v or v < 0:
            raise ValueError(f"rate_ratio_interval: {name} must be a whole number >= 0, got {v!r}")
    n = int(a) + int(b)
    if n == 0:
        return 0.0, math.inf
    ci = stats.binomtest(int(a), n).proportion_ci(confidence_level=confidence, method="exact")
    return _interval(ci.low / (1 - ci.low), math.inf if ci.high >= 1 else ci.high / (1 - ci.high))


def seed_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Student-t interval of the mean over training seeds: mean -+ t * sd / sqrt(n), n >= 2."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size < 2:
        raise ValueError(f"seed_interval: needs values from at least 2 seeds, got {v.size}")
    half = stats.t.ppf(0.5 + confidence / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)
    return _interval(v.mean() - half, v.mean() + half)


def difference_interval(a: Sequence[float], b: Sequence[float],
                        confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Welch's t interval of mean(a) - mean(b), e.g. a quantity of two SAE types over training
    seeds (>= 2 values each; their variances need not be equal)."""
    a, b = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (a, b))
    if a.size < 2 or b.size < 2:
        raise ValueError(f"difference_interval: needs >= 2 values on each side, got {a.size} and {b.size}")
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(confidence)
    return _interval(ci.low, ci.high)


def side(interval: tuple[float, float], threshold: float) -> str:
    """"above" (lo > threshold), "below" (hi < threshold) or "straddles" (also for NaN)."""
    lo, hi = interval
    if lo > threshold:
        return "above"
    if hi < threshold:
        return "below"
    return "straddles"


@dataclass(frozen=True)
class Trend:
    """A number against log10(training budget): direction "toward" / "away" (from the paper's
    value) / "flat"; slope per decade of budget with its 95% interval; and, for "toward", the
    budget at which the fitted line reaches the paper's value."""

    direction: str
    slope: float
    slope_interval: tuple[float, float]
    budget_at_paper: float | None = None


def trend(budgets: Sequence[float], values: Sequence[float], paper: float,
          confidence: float = CONFIDENCE) -> Trend:
    """Fit values against log10(budgets) (>= 3 budgets, all > 0; NaN values left out)."""
    b, v = np.asarray(budgets, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if b.shape != v.shape:
        raise ValueError(f"trend: {b.size} budgets but {v.size} values")
    keep = ~np.isnan(v)
    b, v = b[keep], v[keep]
    if b.size < 3 or np.unique(b).size < 3:
        raise ValueError(f"trend: needs values at >= 3 distinct budgets, got {np.unique(b).size}")
    if (b <= 0).any():
        raise ValueError("trend: budgets must be > 0")
    x = np.log10(b)
    fit = stats.linregress(x, v)
    half = stats.t.ppf(0.5 + confidence / 2, x.size - 2) * fit.stderr
    ci = _interval(fit.slope - half, fit.slope + half)
    if ci[0] <= 0 <= ci[1]:
        return Trend("flat", float(fit.slope), ci)
    last = fit.intercept + fit.slope * x.max()  # the fitted value at the largest budget
    if np.sign(paper - last) != np.sign(fit.slope):
        return Trend("away", float(fit.slope), ci)
    return Trend("toward", float(fit.slope), ci, float(10 ** ((paper - fit.intercept) / fit.slope)))
