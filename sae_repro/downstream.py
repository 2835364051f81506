"""Downstream statistics of spliced runs with intervals over contexts: the Dark Matter downstream
test's shares of each error part, and paired comparisons of two spliced SAEs.

For one SAE, `splice.context_losses` gives each context's summed next-token loss (CE) and KL
with "Sae", "Sae + LinearError" and "Sae + NonlinearError" spliced in
(`decomposition.error_replacements`), and the SAE's squared errors give each context's
||SaeError||^2 and ||NonlinearError||^2 sums. A part's shares:

- variance share: its share of ||SaeError||^2 (= nonlinear FVU / FVU for the nonlinear part);
- CE share (ours): the CE increase of the splice that leaves only this part out, over the SAE's;
- CE share (the authors', `downstream_ce.py`): the share of the SAE's CE increase that adding
  this part back to Sae(x) recovers;
- the same two on KL(clean || spliced) instead of the CE increase (KL cannot go below 0, where
  CE on text far from the model's training data can: a splice may improve calibration).

Every share is a ratio of sums over the contexts, so its 95% interval resamples the contexts
(`intervals.context_bootstrap`), all sums of a context together. The verdict's number is the gap
CE share - variance share (`verdicts.downstream_proportional`).

`compare_splices` gives the difference of two runs' CE loss recovered and KL on the same contexts
(paired: resampling a context resamples both), e.g. a g-SAE against TopK (`verdicts.gsae_faithful`);
`gain_at_equal_l0` a family of runs' mean CE loss recovered above a reference family's curve read
at their L0s (Mutual Choice against TopK, `verdicts.mc_downstream`), the curve redrawn on every
resample.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from torch import Tensor

from sae_repro.intervals import context_bootstrap, per_context
from sae_repro.metrics import ce_loss_recovered, interp_log_l0
from sae_repro.splice import ZERO, ContextLosses

# part -> (the splice that leaves only it out, the splice that adds only it back to Sae(x))
PARTS = {"nonlinear error": ("Sae + LinearError", "Sae + NonlinearError"),
         "linear error": ("Sae + NonlinearError", "Sae + LinearError")}
SHARES = ("variance_share", "ce_share", "ce_share_authors", "kl_share", "kl_share_authors", "gap")


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")


def _shares(ce_clean: np.ndarray, ce_sae: np.ndarray, ce_out: np.ndarray, ce_back: np.ndarray,
            kl_sae: np.ndarray, kl_out: np.ndarray, kl_back: np.ndarray,
            sq_error: np.ndarray, sq_part: np.ndarray) -> dict[str, float]:
    """The shares from per-context sums (all [n_contexts]); NaN where the SAE does no damage."""
    inc = float((ce_sae - ce_clean).sum())
    s = {"variance_share": _ratio(float(sq_part.sum()), float(sq_error.sum())),
         "ce_share": _ratio(float((ce_out - ce_clean).sum()), inc),
         "ce_share_authors": _ratio(float((ce_sae - ce_back).sum()), inc),
         "kl_share": _ratio(float(kl_out.sum()), float(kl_sae.sum())),
         "kl_share_authors": _ratio(float((kl_sae - kl_back).sum()), float(kl_sae.sum()))}
    s["gap"] = s["ce_share"] - s["variance_share"]
    return s


def _pick(stats: Callable[..., dict[str, float]], name: str) -> Callable[..., float]:
    """The statistic `name` of a function returning several (what a bootstrap resamples)."""
    def stat(*arrays: np.ndarray) -> float:
        return stats(*arrays)[name]
    return stat


def error_sums(x: Tensor, x_hat: Tensor, linear: Tensor, context: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-context sums of ||SaeError||^2 and ||NonlinearError||^2.  x, x_hat, linear (x W*):
    [n, d] of the spliced tokens; context [n]: their contexts in splice order -> two [n_contexts]."""
    if not (x.shape == x_hat.shape == linear.shape) or x.ndim != 2 or context.shape != (x.shape[0],):
        raise ValueError(f"error_sums: x, x_hat, linear must be [n, d] and context [n]; got {tuple(x.shape)}, "
                         f"{tuple(x_hat.shape)}, {tuple(linear.shape)}, {tuple(context.shape)}")
    err = (x.float() - x_hat.float()).double()
    nl = err - linear.double()
    return per_context(err.pow(2).sum(1), context), per_context(nl.pow(2).sum(1), context)


def part_shares(losses: ContextLosses, prefix: str, sq_error: np.ndarray, sq_nonlinear: np.ndarray, *,
                seed: int = 0, intervals: bool = True) -> dict[str, dict[str, float]]:
    """Both parts' shares of one SAE, with 95% context-bootstrap intervals.

    losses: the splices, run names `prefix + "Sae"` etc. (e.g. prefix "8x "); sq_error,
    sq_nonlinear: [n_contexts] from `error_sums`, the same contexts in the same order.
    -> {part: {share: value, share + "_lo": ..., share + "_hi": ...}} for each of SHARES."""
    ce_clean, _ = losses.of("clean")
    ce_sae, kl_sae = losses.of(prefix + "Sae")
    if len(sq_error) != len(ce_clean) or len(sq_nonlinear) != len(ce_clean):
        raise ValueError(f"part_shares: {len(ce_clean)} spliced contexts but error sums for "
                         f"{len(sq_error)} / {len(sq_nonlinear)}")
    out = {}
    for part, (left_out, added_back) in PARTS.items():
        ce_out, kl_out = losses.of(prefix + left_out)
        ce_back, kl_back = losses.of(prefix + added_back)
        sq_part = sq_nonlinear if part == "nonlinear error" else sq_error - sq_nonlinear
        arrays = (ce_clean, ce_sae, ce_out, ce_back, kl_sae, kl_out, kl_back, sq_error, sq_part)
        row = _shares(*arrays)
        if intervals:
            for name in SHARES:
                row[name + "_lo"], row[name + "_hi"] = context_bootstrap(_pick(_shares, name), *arrays, seed=seed)
        out[part] = row
    return out


def _recovered(ce_clean: np.ndarray, ce_zero: np.ndarray, ce: np.ndarray) -> float:
    # the metric's one definition, on sums (the ratio of sums is the ratio of means)
    return ce_loss_recovered(float(ce_clean.sum()), float(ce.sum()), float(ce_zero.sum()))


def _compare(ce_clean: np.ndarray, ce_zero: np.ndarray, ce_a: np.ndarray, ce_b: np.ndarray,
             kl_a: np.ndarray, kl_b: np.ndarray, tokens: int) -> dict[str, float]:
    n = len(ce_a) * tokens
    return {"ce_recovered_diff": _recovered(ce_clean, ce_zero, ce_a) - _recovered(ce_clean, ce_zero, ce_b),
            "kl_diff": float((kl_a - kl_b).sum()) / n}


def compare_splices(losses: ContextLosses, a: str, b: str, *, seed: int = 0) -> dict[str, float]:
    """Run a against run b on the same contexts: ce_recovered_diff (a's CE loss recovered - b's)
    and kl_diff (a's mean KL - b's, nats/token), each with its 95% paired context-bootstrap
    interval (`_lo`, `_hi`)."""
    ce_clean, _ = losses.of("clean")
    ce_zero, _ = losses.of(ZERO)
    (ce_a, kl_a), (ce_b, kl_b) = losses.of(a), losses.of(b)
    arrays = (ce_clean, ce_zero, ce_a, ce_b, kl_a, kl_b)
    out = _compare(*arrays, losses.tokens_per_context)
    for name in list(out):
        stat = _pick(lambda *a: _compare(*a, losses.tokens_per_context), name)
        out[name + "_lo"], out[name + "_hi"] = context_bootstrap(stat, *arrays, seed=seed)
    return out


def _gains(ce_clean: np.ndarray, ce_zero: np.ndarray, *ce_runs: np.ndarray, l0: np.ndarray,
           n_ref: int, max_ratio: float) -> np.ndarray:
    """CE loss recovered of each run (the first n_ref the reference) -> the others' gains over
    the reference curve read at their L0 (NaN out of its reach)."""
    rec = np.array([_recovered(ce_clean, ce_zero, ce) for ce in ce_runs])
    return rec[n_ref:] - interp_log_l0(l0[:n_ref], rec[:n_ref], l0[n_ref:], max_ratio=max_ratio)


def gain_at_equal_l0(losses: ContextLosses, runs: dict[str, float], reference: dict[str, float], *,
                     max_ratio: float = 1.0, seed: int = 0) -> dict[str, object]:
    """A family's CE loss recovered above a reference family's curve at equal L0, with a paired
    95% context-bootstrap interval of its mean (the L0s fixed; every run's CE resampled together).

    runs, reference: spliced run name -> its measured L0 (>= 2 reference runs, as
    `metrics.interp_log_l0`, which reads the curve up to `max_ratio` beyond its ends).
    -> {"gains": [len(runs)] (NaN out of reach), "mean_gain", "mean_gain_lo", "mean_gain_hi",
    "n_in_reach"}; the mean over the runs in reach of the curve (NaN if none)."""
    names = list(reference) + list(runs)
    l0 = np.array([reference[n] for n in reference] + [runs[n] for n in runs], dtype=np.float64)
    ce_clean, _ = losses.of("clean")
    ce_zero, _ = losses.of(ZERO)
    arrays = (ce_clean, ce_zero, *(losses.of(n)[0] for n in names))

    def gains(*a: np.ndarray) -> np.ndarray:
        return _gains(*a, l0=l0, n_ref=len(reference), max_ratio=max_ratio)

    g = gains(*arrays)
    reach = ~np.isnan(g)
    out: dict[str, object] = {"gains": g, "n_in_reach": int(reach.sum()),
                              "mean_gain": float(g[reach].mean()) if reach.any() else float("nan")}
    if reach.any():
        # the runs in reach are fixed by the L0s; a NaN on a resample carries through
        lo, hi = context_bootstrap(lambda *a: float(gains(*a)[reach].mean()), *arrays, seed=seed)
    else:
        lo = hi = float("nan")
    return out | {"mean_gain_lo": lo, "mean_gain_hi": hi}
