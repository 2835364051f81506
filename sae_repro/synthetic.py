"""Synthetic check of the linear / nonlinear error split (Engels et al. 2024, "synthetic" section).

The question: when we split an SAE's error into LinearError (predictable from x by a linear map)
and NonlinearError (the rest), do the two parts measure different things? We test it on data
where we *know* what went wrong, by planting two kinds of Gaussian noise:

* activation noise  n_a, added to the activations only:   x' = x + n_a.
  The SAE never sees it (its reconstruction is made from the clean x), so the error x' - x_hat
  contains n_a. But n_a is also *inside the regression's input* x', so a linear map from x' can
  recover much of it: it should show up as **linear** error. (It stands for a dense direction,
  or a feature the SAE has not learned, that is present in x.)
* reconstruction noise  n_r, added to the reconstruction only:   x_hat' = x_hat + n_r.
  It is independent of x', so no function of x' can predict it: it should show up as
  **nonlinear** error. (It stands for the SAE's own mistakes.)

Over a grid of (activation scale, reconstruction scale) we fit the linear error, decompose, and
correlate the planted scales with the measured norms. Expected (the paper's 2x2 table): strong
diagonal (activation noise <-> linear error, reconstruction noise <-> nonlinear error), weak
off-diagonal. As in the paper, the "true" reconstruction is a clean sparse code times a
dictionary (the paper used Gemma Scope reconstructions as the true activations); here the
activations themselves are built from known sparse features by `sparse_features`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from sae_repro.decomposition import decompose, linear_error_fit
from sae_repro.intervals import context_bootstrap
from sae_repro.metrics import fvu

# ----------------------------------------------------------------------------- activations


@dataclass
class SyntheticActivations:
    """Activations made of known parts:  x = codes @ dictionary + dense."""

    x: Tensor  # [n_tokens, d_model]
    codes: Tensor  # [n_tokens, n_features], sparse, >= 0
    dictionary: Tensor  # [n_features, d_model], unit-norm rows
    dense: Tensor  # [n_tokens, d_model], the dense low-rank part (zeros if dense_dim == 0)
    firing_prob: Tensor  # [n_features], the Zipf firing probability of each feature

    @property
    def sparse(self) -> Tensor:
        """The part a perfect SAE could reconstruct: codes @ dictionary.  [n_tokens, d_model]."""
        return self.codes @ self.dictionary


def zipf_firing_prob(n_features: int, avg_active: float, zipf_exponent: float = 1.0) -> Tensor:
    """p_i proportional to (i+1)^-zipf_exponent, scaled so sum_i p_i = avg_active.  -> [n_features].

    Probabilities above 1 are clipped, so the realised L0 is below avg_active if the head of the
    curve saturates (raise n_features or lower avg_active to avoid it).
    """
    ranks = torch.arange(1, n_features + 1, dtype=torch.float64)
    p = ranks.pow(-zipf_exponent)
    return (avg_active * p / p.sum()).clamp(max=1.0)


def sparse_features(
    n_tokens: int,
    d_model: int,
    n_features: int,
    *,
    avg_active: float,
    zipf_exponent: float = 1.0,
    dense_dim: int = 0,
    dense_scale: float = 0.0,
    seed: int = 0,
) -> SyntheticActivations:
    """Sample activations from a known sparse dictionary plus an optional dense part.

    - dictionary: n_features random Gaussian directions in R^d_model, normalised to unit norm.
    - codes: feature i fires independently on each token with probability p_i ~ (i+1)^-zipf
      (mean number active per token = avg_active); when it fires its magnitude is Exp(1).
    - dense: Gaussian coordinates of std `dense_scale` (absolute units) in a random
      `dense_dim`-dimensional subspace, on every token: structure no sparse code captures.
    Everything is drawn from one torch.Generator seeded with `seed`. float32 outputs.
    """
    for name, v in [("n_tokens", n_tokens), ("d_model", d_model), ("n_features", n_features)]:
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not 0 < avg_active <= n_features:
        raise ValueError(f"avg_active must be in (0, n_features={n_features}], got {avg_active}")
    if not 0 <= dense_dim <= d_model:
        raise ValueError(f"dense_dim must be in [0, d_model={d_model}], got {dense_dim}")
    if dense_scale < 0 or not math.isfinite(dense_scale):
        raise ValueError(f"dense_scale must be finite and >= 0, got {dense_scale}")
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(n_features, d_model, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    p = zipf_firing_prob(n_features, avg_active, zipf_exponent).float()
    fires = torch.rand(n_tokens, n_features, generator=g) < p
    magnitude = torch.empty(n_tokens, n_features).exponential_(1.0, generator=g)
    codes = magnitude * fires
    dense = torch.zeros(n_tokens, d_model)
    if dense_dim > 0:
        basis, _ = torch.linalg.qr(torch.randn(d_model, dense_dim, generator=g))  # [d, k] orthonormal
        dense = dense_scale * torch.randn(n_tokens, dense_dim, generator=g) @ basis.T
    return SyntheticActivations(
        x=codes @ dictionary + dense, codes=codes, dictionary=dictionary, dense=dense, firing_prob=p
    )


# ----------------------------------------------------------------------------- noise injection


def rms_norm(x: Tensor) -> float:
    """sqrt(mean_t ||x_t||^2): the root-mean-square token norm (not mean-centred).  x: [n, d]."""
    return float(x.double().pow(2).sum(1).mean().sqrt())


def inject_noise(
    x: Tensor,
    x_hat: Tensor,
    *,
    activation_noise: float,
    reconstruction_noise: float,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """The paper's two planted errors.  x, x_hat: [n, d] -> (x + n_a, x_hat + n_r).

    n_a, n_r: i.i.d. Gaussian, independent of each other and of x. A scale s means each token's
    noise has expected squared norm s^2 * rms_norm(x)^2 (per-coordinate std s * rms_norm(x) /
    sqrt(d)), so s = 1 is noise as large as a typical token.
      activation noise -> in x (the regression input) but not in x_hat: becomes *linear* error.
      reconstruction noise -> in x_hat only, independent of x: becomes *nonlinear* error.
    """
    if x.shape != x_hat.shape or x.ndim != 2:
        raise ValueError(
            f"x and x_hat must be the same 2-D shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}"
        )
    for name, s in [("activation_noise", activation_noise), ("reconstruction_noise", reconstruction_noise)]:
        if not (math.isfinite(s) and s >= 0):
            raise ValueError(f"{name} must be a finite scale >= 0, got {s}")
    g = torch.Generator().manual_seed(seed)
    sigma = rms_norm(x) / math.sqrt(x.shape[1])
    n_a = torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
    n_r = torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
    return x + activation_noise * sigma * n_a, x_hat + reconstruction_noise * sigma * n_r


# ----------------------------------------------------------------------------- the 2x2 table


@dataclass
class NoiseCorrelation:
    """table: 2x2 Pearson correlations (rows: planted noise, columns: measured error);
    grid: one row per (activation, reconstruction) scale pair, for plotting; sums: the held-out
    tokens' squared norms summed over BOOTSTRAP_GROUPS random groups of tokens, per grid point
    ({"count", "error", "linear", "nonlinear", "centered"}: [groups, points]), what
    `diagonal_intervals` resamples; measure: what the table correlates."""

    table: pd.DataFrame
    grid: pd.DataFrame
    sums: dict[str, np.ndarray]
    measure: str = "sq_norm"

    def diagonal_intervals(self, *, seed: int = 0) -> dict[str, tuple[float, float, float]]:
        """The table's summary with 95% intervals, the held-out tokens resampled (in their random
        groups, the same tokens at every grid point: the noise draws stay fixed): "diagonal" =
        the smaller of corr(activation noise, linear error) and corr(reconstruction noise,
        nonlinear error); "off_diagonal" = the larger abs(r) of the other two. -> {name: (value, lo, hi)}."""
        planted = self.grid[["activation_noise", "reconstruction_noise"]].to_numpy(np.float64)
        names = ("count", "error", "linear", "nonlinear", "centered")
        out = {}
        for name, pick in (("diagonal", _diagonal), ("off_diagonal", _off_diagonal)):
            def stat(*s: np.ndarray, pick=pick) -> float:
                return pick(planted, *_measured(dict(zip(names, s)), self.measure))
            lo, hi = context_bootstrap(stat, *(self.sums[n] for n in names), seed=seed)
            out[name] = (stat(*(self.sums[n] for n in names)), lo, hi)
        return out


BOOTSTRAP_GROUPS = 400  # held-out tokens are i.i.d.: resampled in this many random groups


def _measured(sums: dict[str, np.ndarray], measure: str) -> tuple[np.ndarray, np.ndarray]:
    """(linear, nonlinear) per grid point from the group sums [groups, points] (the grid's columns)."""
    t = {k: v.sum(0) for k, v in sums.items()}
    if measure == "sq_norm":
        return t["linear"] / t["count"], t["nonlinear"] / t["count"]
    return (t["error"] - t["nonlinear"]) / t["centered"], t["nonlinear"] / t["centered"]


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")


def _diagonal(planted: np.ndarray, linear: np.ndarray, nonlinear: np.ndarray) -> float:
    """planted [points, 2] (activation, reconstruction scales); linear, nonlinear [points]."""
    return float(np.min([_corr(planted[:, 0], linear), _corr(planted[:, 1], nonlinear)]))  # NaN stays NaN


def _off_diagonal(planted: np.ndarray, linear: np.ndarray, nonlinear: np.ndarray) -> float:
    return float(np.max(np.abs([_corr(planted[:, 0], nonlinear), _corr(planted[:, 1], linear)])))


def _grid_point(x: Tensor, x_hat: Tensor, train_idx: Tensor,
                test_idx: Tensor) -> tuple[dict[str, float], dict[str, Tensor]]:
    """Fit the linear error on train tokens; measure everything on the held-out tokens
    -> (the grid row, per held-out token squared norms of error, linear, nonlinear, x - mean)."""
    fit = linear_error_fit(x, x - x_hat, train_idx=train_idx)
    xt, xht = x[test_idx], x_hat[test_idx]
    dec = decompose(xt, xht, fit)
    fvu_sae, fvu_nonlin = fvu(xt, xht), fvu(xt, xht + dec.linear)
    parts = {"error": dec.sae_error, "linear": dec.linear, "nonlinear": dec.nonlinear,
             "centered": xt - xt.double().mean(0)}
    sq = {k: v.double().pow(2).sum(1) for k, v in parts.items()}  # [n_test] each
    row = {
        "sae_error_sq_norm": float(sq["error"].mean()),
        "linear_error_sq_norm": float(sq["linear"].mean()),
        "nonlinear_error_sq_norm": float(sq["nonlinear"].mean()),
        "fvu_sae": fvu_sae,
        "fvu_nonlinear": fvu_nonlin,
        "fvu_linear": fvu_sae - fvu_nonlin,  # the paper's "linear estimate": FVU drop from adding LinearError
        "r2_per_dim_test": fit.r2_per_dim_test,
    }
    return row, sq


def noise_correlation_table(
    base_x: Tensor,
    base_x_hat: Tensor,
    scales: Sequence[float],
    *,
    seed: int = 0,
    train_frac: float = 0.5,
    measure: Literal["sq_norm", "fvu"] = "sq_norm",
) -> NoiseCorrelation:
    """Plant noise over a scales x scales grid and correlate planted scales with measured errors.

    base_x, base_x_hat: [n, d], the clean activations and their "true" reconstruction (e.g.
    `acts.x` and `acts.sparse` from `sparse_features`). For each (s_a, s_r) in scales x scales:
    x', x_hat' = inject_noise(base_x, base_x_hat, s_a, s_r); fit LinearError on a fixed random
    train split (the same tokens at every grid point); on the held-out tokens record the mean
    squared norm of SaeError, LinearError, NonlinearError and the FVU-style shares.

    measure="sq_norm" correlates the scales with the mean squared norms (absolute sizes);
    measure="fvu" with the paper's FVU quantities (linear: FVU(Sae) - FVU(Sae + Linear);
    nonlinear: FVU(Sae + Linear)), which are shares of x' variance, itself growing with s_a.

    Why activation noise leaks a little into the nonlinear error: a linear map sees only
    x' = x + n_a, so along a direction where x has variance lam and n_a has variance sig^2 it
    recovers n_a only up to the fraction sig^2 / (lam + sig^2); the rest, lam * sig^2 / (lam + sig^2),
    stays nonlinear. That leak saturates at the variance of x, so the off-diagonal is weak once
    the planted noise is large next to x (scales up to ~2 and beyond) and grows for small scales.
    """
    if base_x.shape != base_x_hat.shape or base_x.ndim != 2:
        raise ValueError(
            "base_x and base_x_hat must be the same 2-D shape, "
            f"got {tuple(base_x.shape)} and {tuple(base_x_hat.shape)}"
        )
    scales = [float(s) for s in scales]
    if len(set(scales)) < 2:
        raise ValueError(f"scales must hold at least 2 distinct values to correlate, got {scales}")
    if measure not in ("sq_norm", "fvu"):
        raise ValueError(f"measure must be 'sq_norm' or 'fvu', got {measure!r}")
    n = base_x.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train = int(round(train_frac * n))
    train_idx, test_idx = perm[:n_train].sort().values, perm[n_train:].sort().values
    group = torch.randperm(len(test_idx), generator=torch.Generator().manual_seed(seed + 1)) % BOOTSTRAP_GROUPS
    rows, sums = [], {k: [] for k in ("error", "linear", "nonlinear", "centered")}
    for k, (s_a, s_r) in enumerate(itertools.product(scales, scales)):
        x, x_hat = inject_noise(
            base_x, base_x_hat, activation_noise=s_a, reconstruction_noise=s_r, seed=seed * 100_003 + k
        )
        point, sq = _grid_point(x, x_hat, train_idx, test_idx)
        rows.append({"activation_noise": s_a, "reconstruction_noise": s_r, **point})
        for name, v in sq.items():
            sums[name].append(torch.zeros(BOOTSTRAP_GROUPS, dtype=torch.float64).index_add_(0, group, v).numpy())
    grid = pd.DataFrame(rows)
    groups = {k: np.stack(v, 1) for k, v in sums.items()}  # [groups, points]
    groups["count"] = np.repeat(np.bincount(group.numpy(), minlength=BOOTSTRAP_GROUPS)[:, None].astype(np.float64),
                                len(rows), 1)
    cols = (
        {"linear error": "linear_error_sq_norm", "nonlinear error": "nonlinear_error_sq_norm"}
        if measure == "sq_norm"
        else {"linear error": "fvu_linear", "nonlinear error": "fvu_nonlinear"}
    )
    planted = {"activation noise": "activation_noise", "reconstruction noise": "reconstruction_noise"}
    table = pd.DataFrame(
        [[np.corrcoef(grid[p], grid[m])[0, 1] for m in cols.values()] for p in planted.values()],
        index=list(planted),
        columns=list(cols),
    )
    return NoiseCorrelation(table=table, grid=grid, sums=groups, measure=measure)
