"""The Dark Matter paper's headline numbers, each with a 95% interval.

    scores = headline_scores(x_test, {width: x_hat, ...}, main_width=4608, context=context)
    scores.vector_r2, scores.vector_r2_interval, scores.flat_ratio, ...

For SAEs of several widths at one k and one training budget, scored on the same held-out tokens
(`decomposition.error_summary`'s seeded half of x):
- vector R^2 of the main SAE (per dimension, the paper's "about half of the error vector");
- norm R^2: the median over the widths of the held-out R^2 of ||SaeError||^2 from [x, 1];
- flat ratio: the nonlinear FVU's relative drop from the narrowest to the widest SAE over the
  FVU's (`verdicts.flat_ratio`; "the nonlinear FVU stays flat" is a ratio near 0);
- same tokens: the median over width pairs of the R^2 of the larger SAE's per-token error norm
  from the smaller one's (`decomposition.per_token_scaling`);
- nonlinear norm helps: the median over width pairs of the share of that R^2's remaining
  variance that the smaller SAE's nonlinear error norm removes as a second regressor.
And `pursuit_gain`: what gradient pursuit on an SAE's own decoder changes (nonlinear FVU, FVU).
The regressions are fitted once; the intervals resample the scored tokens by context
(`intervals.r2_bootstrap`), the statistic recomputed from every prediction's R^2 jointly. Run at
every rung of the budget ladder, these give the trend of each number with training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from sae_repro.decomposition import ErrorSummary, PerTokenScaling, error_summary, per_token_scaling, pursuit_reconstruct
from sae_repro.intervals import context_bootstrap, r2_bootstrap

if TYPE_CHECKING:
    from sae_repro.sae import SparseAutoencoder


@dataclass
class HeadlineScores:
    """The four numbers with their 95% intervals, and what they were computed from."""

    vector_r2: float
    vector_r2_interval: tuple[float, float]
    norm_r2: float  # median over the widths
    norm_r2_interval: tuple[float, float]
    flat_ratio: float
    flat_ratio_interval: tuple[float, float]
    same_tokens_r2: float  # median over the width pairs
    same_tokens_r2_interval: tuple[float, float]
    helps_share: float  # median over the width pairs
    helps_share_interval: tuple[float, float]
    summaries: dict[int, ErrorSummary] = field(repr=False)
    pairs: dict[tuple[int, int], PerTokenScaling] = field(repr=False)

    def row(self) -> dict[str, float]:
        """The numbers and interval ends as flat columns (name, name_lo, name_hi)."""
        out = {}
        for name in ("vector_r2", "norm_r2", "flat_ratio", "same_tokens_r2", "helps_share"):
            lo, hi = getattr(self, f"{name}_interval")
            out |= {name: getattr(self, name), f"{name}_lo": lo, f"{name}_hi": hi}
        return out


def _flat_ratio_from_r2(r: np.ndarray) -> float:
    """r: pooled R^2 of [Sae narrowest, Sae + linear narrowest, Sae widest, Sae + linear widest]
    as predictions of x -> (nonlinear FVU's relative drop) / (FVU's), FVU = 1 - R^2."""
    f_n, nl_n, f_w, nl_w = 1 - r
    d_fvu = (f_n - f_w) / f_n
    return float(((nl_n - nl_w) / nl_n) / d_fvu) if d_fvu > 0 else float("nan")


def _helps_share_from_r2(r: np.ndarray) -> float:
    """r: pooled R^2 [without_1, with_1, without_2, with_2, ...] -> the median over the pairs of
    (with - without) / (1 - without)."""
    r0, r1 = r[0::2], r[1::2]
    # NaN (a pair fully explained without it) left out, as the table's median does
    return float(np.nanmedian(np.where(r0 < 1, (r1 - r0) / np.where(r0 < 1, 1 - r0, 1.0), np.nan)))


def headline_scores(x: Tensor, x_hats: dict[int, Tensor], *, main_width: int, context: Tensor,
                    seed: int = 0, summaries: dict[int, ErrorSummary] | None = None) -> HeadlineScores:
    """x: [n, d] held-out activations; x_hats: width -> an SAE's reconstruction of x [n, d], at
    least two widths, main_width among them; context: [n] each token's context (what the
    bootstrap resamples). summaries: width -> `error_summary(x, x_hats[w], seed=seed)` where the
    caller has them already (they are computed here otherwise)."""
    widths = sorted(x_hats)
    if len(widths) < 2 or main_width not in x_hats:
        raise ValueError(f"headline_scores: needs >= 2 widths including main_width={main_width}, got {widths}")
    context = torch.as_tensor(context).reshape(-1)
    if len(context) != len(x):
        raise ValueError(f"headline_scores: context has {len(context)} tokens, x has {len(x)}")
    given = summaries or {}
    summaries = {w: given[w] if w in given else error_summary(x, x_hats[w], seed=seed) for w in widths}
    test_idx = summaries[widths[0]].test_idx
    if not all(torch.equal(s.test_idx, test_idx) for s in summaries.values()):
        raise ValueError("headline_scores: the widths' reconstructions must be of the same tokens x")
    ctx = context[test_idx]
    main = summaries[main_width]
    vec, vec_ci = r2_bootstrap([main.vector_pair()], ctx, lambda r: r[0], per_dim=True, seed=seed)
    norm, norm_ci = r2_bootstrap([summaries[w].norm_test for w in widths], ctx, np.median, seed=seed)
    xt = x[test_idx]
    ends = [summaries[widths[0]], summaries[widths[-1]]]
    fvu_pairs = [pair for s, w in zip(ends, (widths[0], widths[-1]))
                 for pair in ((xt, x_hats[w][test_idx]), (xt, x_hats[w][test_idx] + s.test.linear))]
    flat, flat_ci = r2_bootstrap(fvu_pairs, ctx, _flat_ratio_from_r2, seed=seed)
    norms = {w: (s.test.sae_error.norm(dim=1), s.test.nonlinear.norm(dim=1)) for w, s in summaries.items()}
    pairs = {(wi, wj): per_token_scaling(norms[wi][0], norms[wj][0], norms[wi][1], seed=seed)
             for a, wi in enumerate(widths) for wj in widths[a + 1:]}
    pair_ctx = ctx[next(iter(pairs.values())).test_idx]
    same, same_ci = r2_bootstrap([p.pair_without for p in pairs.values()], pair_ctx, np.median, seed=seed)
    both = [q for p in pairs.values() for q in (p.pair_without, p.pair_with)]
    helps, helps_ci = r2_bootstrap(both, pair_ctx, _helps_share_from_r2, seed=seed)
    return HeadlineScores(vec, vec_ci, norm, norm_ci, flat, flat_ci, same, same_ci, helps, helps_ci,
                          summaries, pairs)


@dataclass
class Reduction:
    """How much a change removes of an error, token by token: sq_before, sq_after [n] squared
    residual norms (e.g. ||x - (Sae + LinearError)||^2 before and after a predictor of the
    nonlinear error is added), context [n] each token's context. value: 1 - sum after / sum before,
    the relative decrease of the FVU (its denominator, the tokens' variance, cancels)."""

    sq_before: np.ndarray
    sq_after: np.ndarray
    context: np.ndarray

    @property
    def value(self) -> float:
        return float(1 - self.sq_after.sum() / self.sq_before.sum())


def _reduction(x: Tensor, before: Tensor, after: Tensor, context: Tensor) -> Reduction:
    sq = [(x.double() - r.double()).pow(2).sum(1).numpy() for r in (before, after)]
    return Reduction(sq[0], sq[1], torch.as_tensor(context).reshape(-1).numpy())


def reduction_difference(a: Reduction, b: Reduction, *, seed: int = 0) -> tuple[float, tuple[float, float]]:
    """a.value - b.value with a 95% interval over contexts, the two measured on token sets that
    may overlap or differ (e.g. a regression's held-out half and pursuit's subset): a resampled
    context brings its tokens in both, so the shared contexts are paired."""
    ids, codes = np.unique(np.concatenate([a.context, b.context]), return_inverse=True)
    ca, cb = codes[:len(a.context)], codes[len(a.context):]
    sums = [np.stack([np.bincount(c, r.sq_before, len(ids)), np.bincount(c, r.sq_after, len(ids))], 1)
            for c, r in ((ca, a), (cb, b))]

    def diff(sa: np.ndarray, sb: np.ndarray) -> float:
        return float((1 - sa[:, 1].sum() / sa[:, 0].sum()) - (1 - sb[:, 1].sum() / sb[:, 0].sum()))

    return diff(*sums), context_bootstrap(diff, *sums, seed=seed)


def pursuit_gain(sae: "SparseAutoencoder", x: Tensor, context: Tensor, *, seed: int = 0) -> dict[str, float]:
    """Gradient pursuit on the SAE's own decoder at the SAE's per-token L0, against its encoder,
    on held-out x [n, d] (context [n]: each token's context). Each reconstruction is decomposed
    with its own W* fitted on the same seeded half; scored on the other half:
    -> nonlinear_gain = 1 - nonlinear FVU (pursuit) / (encoder), the paper's "very slight
    decrease", with its 95% interval (nonlinear_gain_lo, _hi); fvu_gain, the same for the FVU,
    with its interval; gain_ratio = nonlinear_gain / fvu_gain (how much of what pursuit fixes is
    nonlinear error); the four FVUs and both L0s. `pursuit_gain_and_reduction` also gives the
    nonlinear gain token by token."""
    return pursuit_gain_and_reduction(sae, x, context, seed=seed)[0]


def pursuit_gain_and_reduction(sae: "SparseAutoencoder", x: Tensor, context: Tensor, *,
                               seed: int = 0) -> tuple[dict[str, float], Reduction]:
    """`pursuit_gain` and its nonlinear gain as a `Reduction` (its value is nonlinear_gain)."""
    from sae_repro.train import reconstruct

    x_hat, l0 = reconstruct(sae, x)
    x_gp, l0_gp = pursuit_reconstruct(sae, x, l0)
    enc, gp = error_summary(x, x_hat, seed=seed), error_summary(x, x_gp, seed=seed)
    te = enc.test_idx
    ctx, xt = torch.as_tensor(context).reshape(-1)[te], x[te]
    pairs = [(xt, x_hat[te]), (xt, x_hat[te] + enc.test.linear), (xt, x_gp[te]), (xt, x_gp[te] + gp.test.linear)]
    nl_gain, nl_ci = r2_bootstrap(pairs, ctx, lambda r: 1 - (1 - r[3]) / (1 - r[1]), seed=seed)
    fvu_gain, fvu_ci = r2_bootstrap(pairs, ctx, lambda r: 1 - (1 - r[2]) / (1 - r[0]), seed=seed)
    gain = {"fvu_encoder": enc.fvu, "fvu_pursuit": gp.fvu, "nonlinear_fvu_encoder": enc.nonlinear_fvu,
            "nonlinear_fvu_pursuit": gp.nonlinear_fvu, "l0_encoder": float(l0.float().mean()),
            "l0_pursuit": float(l0_gp.float().mean()), "nonlinear_gain": nl_gain, "nonlinear_gain_lo": nl_ci[0],
            "nonlinear_gain_hi": nl_ci[1], "fvu_gain": fvu_gain, "fvu_gain_lo": fvu_ci[0], "fvu_gain_hi": fvu_ci[1],
            "gain_ratio": nl_gain / fvu_gain if fvu_gain != 0 else float("nan")}
    return gain, _reduction(xt, pairs[1][1], pairs[3][1], ctx)


PARTS = ("SaeError", "LinearError", "NonlinearError")


def component_r2(x: Tensor, x_hat: Tensor, predictors: dict[str, Tensor], *, train_idx: Tensor,
                 context: Tensor, seed: int = 0) -> list[dict[str, float]]:
    """The authors' reading of "earlier components" (`simple_circuits.py`, per NOTES.md): for each
    predictor (an earlier component's SAE reconstruction [n, d_p]) and each part of the SAE's
    error (SaeError, LinearError, NonlinearError [n, d], LinearError fitted from x on
    `train_idx`), one least-squares regression of the part on the predictor, no intercept,
    fitted on `train_idx`; the held-out R^2 per output dimension, averaged, with its 95%
    context-bootstrap interval (context [n]). -> rows (predictor, part, r2, r2_lo, r2_hi)."""
    from sae_repro.decomposition import linear_error_fit

    err = (x - x_hat).double()
    fit = linear_error_fit(x, err, train_idx=train_idx)
    te = fit.test_idx
    linear = fit.predict(x.double())
    parts = dict(zip(PARTS, (err, linear, err - linear)))
    ctx = torch.as_tensor(context).reshape(-1)[te]
    rows = []
    for name, p in predictors.items():
        for part, target in parts.items():
            pf = linear_error_fit(p, target, train_idx=fit.train_idx)
            r2, (lo, hi) = r2_bootstrap([(target[te], pf.predict(p[te].double()))], ctx, lambda r: r[0],
                                        per_dim=True, seed=seed)
            rows.append({"predictor": name, "part": part, "r2": r2, "r2_lo": lo, "r2_hi": hi})
    return rows


RIDGE_ALPHAS = np.logspace(-5, 3, 17)  # times n_train * the mean variance of a predictor column


def ridge_nonlinear(x: Tensor, x_hat: Tensor, predictor: Tensor, *, train_idx: Tensor) -> dict[str, float]:
    """`decomposition.explain_nonlinear` for one wide predictor [n, d_p] (e.g. three SAE outputs
    side by side), with a ridge penalty instead of plain least squares: scikit-learn's RidgeCV
    (with an intercept) picks the penalty on the fitting tokens by efficient leave-one-out
    error, from RIDGE_ALPHAS scaled to the predictor; scored on the other tokens like
    explain_nonlinear. -> dict(r2, nonlinear_fvu, nonlinear_fvu_after, alpha).
    `ridge_nonlinear_and_reduction` also gives the reduction token by token."""
    return ridge_nonlinear_and_reduction(x, x_hat, predictor, train_idx=train_idx,
                                         context=torch.zeros(len(x), dtype=torch.long))[0]


def ridge_nonlinear_and_reduction(x: Tensor, x_hat: Tensor, predictor: Tensor, *, train_idx: Tensor,
                                  context: Tensor) -> tuple[dict[str, float], Reduction]:
    """`ridge_nonlinear` and its reduction of the nonlinear FVU as a `Reduction` on the scored
    tokens (context [n]: each token's context)."""
    from sklearn.linear_model import RidgeCV

    from sae_repro.decomposition import nonlinear_target
    from sae_repro.metrics import fvu

    fit, nonlinear, base = nonlinear_target(x, x_hat, train_idx=train_idx)
    tr, te = fit.train_idx, fit.test_idx
    p = predictor.double().numpy()
    scale = len(tr) * float(p[tr].var(0).mean())
    ridge = RidgeCV(alphas=RIDGE_ALPHAS * scale).fit(p[tr], nonlinear[tr].numpy())
    pred = torch.from_numpy(ridge.predict(p[te]))
    held = nonlinear[te]
    r2 = 1 - float((held - pred).pow(2).sum() / (held - held.mean(0)).pow(2).sum())
    out = {"r2": r2, "nonlinear_fvu": fvu(x[te], base), "nonlinear_fvu_after": fvu(x[te], base + pred),
           "alpha": float(ridge.alpha_)}
    return out, _reduction(x[te], base, base + pred, torch.as_tensor(context).reshape(-1)[te])
