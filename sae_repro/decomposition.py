"""Dark-matter decomposition of SAE error (Engels, Riggs, Tegmark 2024), as in the authors' code.

    SaeError(x)       = x - Sae(x)
    LinearError(x)    = x @ W*,  W* = argmin_W sum_t ||x_t W - SaeError(x_t)||^2   (least squares)
    NonlinearError(x) = SaeError(x) - LinearError(x)
    so  x = Sae(x) + LinearError(x) + NonlinearError(x)  exactly.

W* is fitted on a random subset of tokens and scored on the rest. Regressions run in float64.
Also here: error-norm prediction, per-token scaling across widths, the width power law, and
inference-time gradient pursuit on an SAE's own decoder.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import OptimizeWarning, curve_fit
from torch import Tensor

from sae_repro.metrics import fvu

if TYPE_CHECKING:
    from sae_repro.sae import SparseAutoencoder

# ----------------------------------------------------------------------------- input checks


def _check_2d(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n_tokens, d], got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf; only finite values are allowed")


def _check_pair(name_a: str, a: Tensor, name_b: str, b: Tensor, *, same_width: bool = True) -> None:
    _check_2d(name_a, a)
    _check_2d(name_b, b)
    if a.shape[0] != b.shape[0] or (same_width and a.shape != b.shape):
        want = "the same shape" if same_width else "the same number of tokens"
        raise ValueError(
            f"{name_a} and {name_b} must have {want}, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def _as_column(name: str, t: Tensor) -> Tensor:
    """A per-token scalar [n] (or [n, 1]) -> [n, 1]."""
    if isinstance(t, Tensor) and t.ndim == 1:
        t = t[:, None]
    _check_2d(name, t)
    if t.shape[1] != 1:
        raise ValueError(f"{name} must be one scalar per token, shape [n_tokens], got {tuple(t.shape)}")
    return t


# ----------------------------------------------------------------------------- R^2 scores


def r2_per_dim(y_true: Tensor, y_pred: Tensor) -> float:
    """R^2 of each output dimension, averaged over dimensions.  y_true, y_pred: [n, d].

    This is the vector score the paper reports (the authors' `calculate_r_squared`): every
    dimension counts equally, however little variance it has. A dimension with zero variance
    scores 1 if predicted exactly and 0 otherwise (sklearn's convention; the authors' code would
    give NaN/-inf there).
    """
    _check_pair("y_true", y_true, "y_pred", y_pred)
    return _r2_per_dim(y_true.double(), y_pred.double())


def r2_total(y_true: Tensor, y_pred: Tensor) -> float:
    """1 - sum ||y - y_pred||^2 / sum ||y - mean(y)||^2, pooled over dimensions.  [n, d] each.

    Equals `1 - fvu(y_true, y_pred)`: high-variance dimensions dominate. Not the paper's vector
    score (that is `r2_per_dim`); for a single output column the two coincide. A target without
    variance scores 1 if predicted exactly and 0 otherwise (sklearn's convention, as r2_per_dim).
    """
    _check_pair("y_true", y_true, "y_pred", y_pred)
    return _r2_total(y_true.double(), y_pred.double())


def _r2_total(y: Tensor, p: Tensor) -> float:
    """Unchecked core of r2_total (fvu itself rejects a constant target: an SAE metric)."""
    if not float((y - y.mean(0, keepdim=True)).pow(2).sum()) > 0:
        return float(torch.equal(y, p))
    return 1.0 - fvu(y, p)


def _r2_per_dim(y: Tensor, p: Tensor) -> float:
    """Unchecked float64 core of r2_per_dim."""
    ss_res = (y - p).pow(2).sum(0)
    ss_tot = (y - y.mean(0, keepdim=True)).pow(2).sum(0)
    flat = ss_tot == 0
    r2 = torch.where(flat, (ss_res == 0).double(), 1 - ss_res / torch.where(flat, 1.0, ss_tot))
    return float(r2.mean())


# ----------------------------------------------------------------------------- linear error


@dataclass
class LinearFit:
    """Least-squares map from activations to a target (the SAE error, or a norm).

    W: [d_in (+1 if bias), d_out] float64; the last row is the intercept when bias=True.
    Scores are per-dimension-averaged R^2 (the paper's) and pooled R^2 (= 1 - FVU).
    """

    W: Tensor
    bias: bool
    r2_per_dim_train: float
    r2_per_dim_test: float
    r2_total_train: float
    r2_total_test: float
    n_train: int
    n_test: int
    train_idx: Tensor  # [n_train] token indices used for the fit; the rest are the test set
    test_idx: Tensor  # [n_test]

    def predict(self, x: Tensor) -> Tensor:
        """x: [n, d_in] -> [n, d_out], in x's dtype (computed in float64)."""
        d_in = self.W.shape[0] - int(self.bias)
        _check_2d("x", x)
        if x.shape[1] != d_in:
            raise ValueError(f"x must have {d_in} columns (the fit's d_in), got {x.shape[1]}")
        return (_design(x, self.bias) @ self.W.to(x.device)).to(x.dtype)


@contextlib.contextmanager
def _one_thread():
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)


def least_squares(A: Tensor, y: Tensor) -> Tensor:
    """argmin_W ||A W - y||^2 for A [n, p], y [n, q] -> W [p, q] float64, bit-reproducible on CPU.

    The authors (and we, before) call `torch.linalg.lstsq`; its LAPACK drivers are not
    reproducible run to run on CPU (~1e-12 apart on the same bytes), which moved every key and
    number downstream of an error decomposition. The normal equations are: G = A^T A and A^T y are
    matmuls, and they and the p x p factorisation run on one thread (how MKL splits a product's
    reduction over threads depends on the thread count: on AVX512 Xeons A^T y at 1 and 2 threads
    differ in the last bit; one thread costs ~0.7 s more per fit of 88k x 577 on 2 cores).
    Cholesky where G is positive definite; otherwise (collinear columns) the minimum-norm
    solution from G's eigendecomposition, dropping eigenvalues below p * eps * the largest
    (lstsq's rcond on singular values, squared). In float64 both agree with lstsq to ~1e-10 on
    activations (tests/test_decomposition.py checks 1e-6).
    """
    A, y = A.double(), y.double()
    with _one_thread():
        G, r = A.T @ A, A.T @ y
        L, info = torch.linalg.cholesky_ex(G)
        if int(info) == 0:
            return torch.cholesky_solve(r, L)
        ev, V = torch.linalg.eigh(G)
        keep = ev > ev.max() * G.shape[0] * torch.finfo(torch.float64).eps
        return V[:, keep] @ ((V[:, keep].T @ r) / ev[keep, None])


def _design(x: Tensor, bias: bool) -> Tensor:
    """[n, d] -> float64 [n, d (+1)], a column of ones appended for the intercept."""
    x = x.double()
    return torch.cat([x, torch.ones_like(x[:, :1])], 1) if bias else x


def _split(n: int, train_frac: float, seed: int, train_idx: Tensor | None) -> tuple[Tensor, Tensor]:
    """Random (seeded) train/test token indices, or the complement of a given train_idx."""
    if train_idx is None:
        if not 0.0 < train_frac < 1.0:
            raise ValueError(f"train_frac must be in (0, 1), got {train_frac}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        n_train = int(round(train_frac * n))
        return perm[:n_train].sort().values, perm[n_train:].sort().values
    train_idx = torch.as_tensor(train_idx, dtype=torch.long).flatten().cpu()
    if len(train_idx) and (train_idx.min() < 0 or train_idx.max() >= n):
        raise ValueError(f"train_idx must hold token indices in [0, {n}), got out-of-range values")
    mask = torch.zeros(n, dtype=torch.bool)
    mask[train_idx] = True
    if int(mask.sum()) != len(train_idx):
        raise ValueError("train_idx must not repeat indices")
    return train_idx.sort().values, (~mask).nonzero().flatten()


def linear_error_fit(
    x: Tensor,
    err: Tensor,
    *,
    train_frac: float = 0.5,
    bias: bool = False,
    seed: int = 0,
    train_idx: Tensor | None = None,
) -> LinearFit:
    """Fit err ~ x @ W by least squares on a random train split; score on held-out tokens.

    x: [n, d_in] activations; err: [n, d_out] target, usually the SAE error x - Sae(x).
    bias=False matches the paper's plain `lstsq` (no intercept). `train_idx` overrides the random
    split (the rest is the test set). Needs n_train > d_in + 1 and at least 2 test tokens.
    """
    _check_pair("x", x, "err", err, same_width=False)
    n, d_in = x.shape
    tr, te = _split(n, train_frac, seed, train_idx)
    if len(tr) <= d_in + 1:
        raise ValueError(
            f"n_train must exceed d_in + 1 = {d_in + 1} for the regression to be determined, "
            f"got n_train={len(tr)} (n_tokens={n}, train_frac={train_frac})"
        )
    if len(te) < 2:
        raise ValueError(f"need at least 2 held-out tokens to score the fit, got n_test={len(te)}")
    dev = x.device
    A, y = _design(x, bias), err.double()
    tr_d, te_d = tr.to(dev), te.to(dev)
    W = least_squares(A[tr_d], y[tr_d])
    pred_tr, pred_te = A[tr_d] @ W, A[te_d] @ W
    return LinearFit(
        W=W,
        bias=bias,
        r2_per_dim_train=_r2_per_dim(y[tr_d], pred_tr),
        r2_per_dim_test=_r2_per_dim(y[te_d], pred_te),
        r2_total_train=_r2_total(y[tr_d], pred_tr),
        r2_total_test=_r2_total(y[te_d], pred_te),
        n_train=len(tr),
        n_test=len(te),
        train_idx=tr,
        test_idx=te,
    )


@dataclass
class Decomposition:
    """sae_error = x - x_hat = linear + nonlinear.  All [n, d]."""

    sae_error: Tensor  # x - Sae(x)
    linear: Tensor  # LinearError(x) = fit.predict(x)
    nonlinear: Tensor  # NonlinearError(x) = sae_error - linear


def decompose(x: Tensor, x_hat: Tensor, fit: LinearFit) -> Decomposition:
    """Split the SAE error of x into its linear and nonlinear parts.  x, x_hat: [n, d].

    By construction x == x_hat + linear + nonlinear up to float rounding.
    """
    _check_pair("x", x, "x_hat", x_hat)
    sae_error = x - x_hat
    linear = fit.predict(x)
    if linear.shape != sae_error.shape:
        raise ValueError(
            f"fit predicts shape {tuple(linear.shape)} but the SAE error is {tuple(sae_error.shape)}"
        )
    return Decomposition(sae_error=sae_error, linear=linear, nonlinear=sae_error - linear)


def nonlinear_fvu(x: Tensor, x_hat: Tensor, fit: LinearFit) -> float:
    """FVU of Sae(x) + LinearError(x), i.e. the share of variance left in NonlinearError.  [n, d]."""
    _check_pair("x", x, "x_hat", x_hat)
    return fvu(x, x_hat + fit.predict(x))


def norm_prediction(
    x: Tensor, target_norm_sq: Tensor, *, train_frac: float = 0.5, seed: int = 0
) -> LinearFit:
    """Regress a per-token scalar (the paper: ||SaeError(x)||^2) on [x, 1]; read `.r2_total_test`.

    x: [n, d]; target_norm_sq: [n]. The held-out R^2 is the paper's "more than 90% of the error
    norm is linearly predictable" headline. (With one output, per-dim and pooled R^2 agree.)
    """
    target = _as_column("target_norm_sq", target_norm_sq)
    return linear_error_fit(x, target, train_frac=train_frac, bias=True, seed=seed)


@dataclass
class ErrorSummary:
    """The paper's headline numbers for one SAE on one set of tokens (all scored held-out).

    fvu: FVU of Sae(x); nonlinear_fvu: FVU of Sae(x) + LinearError(x); linear_fvu: their
    difference (the variance the linear map removes). vector_r2: per-dimension R^2 of the linear
    prediction of SaeError, averaged over dimensions (the paper's "about half of the error
    vector"); vector_r2_total: the pooled R^2 (= share of the error's variance predicted).
    norm_r2: R^2 of ||SaeError||^2 regressed on [x, 1] (the paper's "more than 90% of the norm").
    fit / test: the error fit and the held-out decomposition, for further analysis.
    """

    fvu: float
    nonlinear_fvu: float
    linear_fvu: float
    vector_r2: float
    vector_r2_total: float
    norm_r2: float
    n_fit: int
    n_test: int
    fit: LinearFit
    test: Decomposition
    test_idx: Tensor  # [n_test] indices into x of the held-out tokens
    norm_fit: LinearFit | None = None  # ||SaeError||^2 from [x, 1], fitted on fit.train_idx
    norm_test: tuple[Tensor, Tensor] | None = None  # held-out (||SaeError||^2, its prediction), [n_test] each

    def vector_pair(self) -> tuple[Tensor, Tensor]:
        """(SaeError, LinearError) on the held-out tokens [n_test, d]: vector R^2's prediction."""
        return self.test.sae_error, self.test.linear

    def row(self) -> dict[str, float]:
        """The scalar fields, for a table."""
        return {k: getattr(self, k) for k in ("fvu", "nonlinear_fvu", "linear_fvu", "vector_r2",
                                              "vector_r2_total", "norm_r2", "n_fit", "n_test")}


def error_summary(x: Tensor, x_hat: Tensor, *, train_frac: float = 0.5, seed: int = 0) -> ErrorSummary:
    """Fit LinearError on a random `train_frac` of the tokens; report everything on the rest.

    x, x_hat: [n, d] activations and the SAE's reconstructions of them (tokens the SAE was not
    trained on). The same split serves the error fit and the norm prediction.
    """
    _check_pair("x", x, "x_hat", x_hat)
    err = x - x_hat
    fit = linear_error_fit(x, err, train_frac=train_frac, seed=seed)
    te = fit.test_idx.to(x.device)
    xt, xht = x[te], x_hat[te]
    dec = decompose(xt, xht, fit)
    norm_fit = linear_error_fit(x, err.double().pow(2).sum(1, keepdim=True), bias=True,
                                train_idx=fit.train_idx)
    fvu_sae, fvu_nl = fvu(xt, xht), fvu(xt, xht + dec.linear)
    norm_sq = err.double().pow(2).sum(1)[te]
    return ErrorSummary(fvu=fvu_sae, nonlinear_fvu=fvu_nl, linear_fvu=fvu_sae - fvu_nl,
                        vector_r2=fit.r2_per_dim_test, vector_r2_total=fit.r2_total_test,
                        norm_r2=norm_fit.r2_total_test, n_fit=fit.n_train, n_test=fit.n_test,
                        fit=fit, test=dec, test_idx=fit.test_idx, norm_fit=norm_fit,
                        norm_test=(norm_sq, norm_fit.predict(xt.double())[:, 0]))


def norm_baselines(target: Tensor, features: dict[str, Tensor], *, train_idx: Tensor,
                   tokens: Tensor | None = None) -> dict[str, float]:
    """Held-out R^2 of predicting a per-token scalar (the squared SAE-error norm) from baselines.

    target: [n]. features: name -> [n] or [n, k] per-token regressors, each fitted by least
    squares with an intercept on `train_idx` and scored on the other tokens (e.g. "loss": the
    model's next-token loss, "L0", "activation norm"). tokens: [n] token ids for the "token
    identity" baseline: each held-out token is predicted by the mean target of the training tokens
    with the same id (the training mean for ids never seen). Pass the split of the norm fit it is
    compared with (`ErrorSummary.fit.train_idx`) so that all scores share held-out tokens.
    """
    y = _as_column("target", target)
    out: dict[str, float] = {}
    for name, f in features.items():
        out[name] = linear_error_fit(_as_column(name, f) if f.ndim == 1 else f, y, bias=True,
                                     train_idx=train_idx).r2_total_test
    if tokens is not None:
        if tokens.shape != (y.shape[0],):
            raise ValueError(f"tokens must be [n_tokens={y.shape[0]}] ids, got {tuple(tokens.shape)}")
        tr, te = _split(y.shape[0], 0.5, 0, train_idx)
        yd, ids = y[:, 0].double(), tokens.long().cpu()
        n_ids = int(ids.max()) + 1
        sums = torch.zeros(n_ids, dtype=torch.float64).index_add_(0, ids[tr], yd[tr])
        ones = torch.ones(len(tr), dtype=torch.float64)
        counts = torch.zeros(n_ids, dtype=torch.float64).index_add_(0, ids[tr], ones)
        means = torch.where(counts > 0, sums / counts.clamp_min(1), yd[tr].mean())
        out["token identity"] = 1.0 - fvu(yd[te, None], means[ids[te], None])
    return out


def nonlinear_target(x: Tensor, x_hat: Tensor, *, train_idx: Tensor) -> tuple[LinearFit, Tensor, Tensor]:
    """What a predictor of the nonlinear error is fitted to and scored against.

    x, x_hat: [n, d]. LinearError is fitted from x on `train_idx` -> (the fit, NonlinearError
    [n, d] float64 on every token, Sae + LinearError [n_test, d] float64 on the fit's test_idx).
    """
    _check_pair("x", x, "x_hat", x_hat)
    fit = linear_error_fit(x, x - x_hat, train_idx=train_idx)
    nonlinear = (x - x_hat).double() - fit.predict(x.double())
    te = fit.test_idx
    return fit, nonlinear, x_hat[te].double() + fit.predict(x[te].double())


def explain_nonlinear(x: Tensor, x_hat: Tensor, predictors: dict[str, Tensor], *,
                      train_idx: Tensor) -> list[dict[str, float]]:
    """How much of the nonlinear error do other signals predict linearly (the paper's "earlier
    components": SAE reconstructions of the previous layer, the attention and the MLP output)?

    x, x_hat: [n, d] activations and SAE reconstructions. LinearError is fitted from x on
    `train_idx` as usual; then NonlinearError is regressed on each predictor [n, d_p] (with an
    intercept) on the same tokens, and everything is scored on the other tokens. Returns one row
    per predictor: r2 (share of the held-out nonlinear error's variance it predicts),
    nonlinear_fvu (FVU of Sae + LinearError, the same for all rows) and nonlinear_fvu_after
    (FVU of Sae + LinearError + the prediction).
    """
    fit, nonlinear, base = nonlinear_target(x, x_hat, train_idx=train_idx)
    te = fit.test_idx
    rows = []
    for name, p in predictors.items():
        _check_pair("x", x, name, p, same_width=False)
        pf = linear_error_fit(p, nonlinear, bias=True, train_idx=fit.train_idx)
        rows.append({"predictor": name, "r2": pf.r2_total_test,
                     "nonlinear_fvu": fvu(x[te], base),
                     "nonlinear_fvu_after": fvu(x[te], base + pf.predict(p[te].double()))})
    return rows


# ----------------------------------------------------------------------------- per-token scaling


@dataclass
class PerTokenScaling:
    """Held-out R^2 of ||SaeError_j|| from ||SaeError_i|| (widths i < j), with and without
    ||NonlinearError_i|| as an extra regressor."""

    r2_without: float
    r2_with: float | None  # None if nonlinear_norm_i was not given
    share_removed: float | None  # (r2_with - r2_without) / (1 - r2_without)
    n_train: int
    n_test: int
    test_idx: Tensor | None = None  # [n_test] the scored tokens
    pair_without: tuple[Tensor, Tensor] | None = None  # held-out (||SaeError_j||, its prediction)
    pair_with: tuple[Tensor, Tensor] | None = None  # ... and its prediction with ||NonlinearError_i||

    def row(self) -> dict[str, float | int | None]:
        """The scalar fields, for a table."""
        return {k: getattr(self, k) for k in ("r2_without", "r2_with", "share_removed", "n_train", "n_test")}


def per_token_scaling(
    err_norm_i: Tensor,
    err_norm_j: Tensor,
    nonlinear_norm_i: Tensor | None = None,
    *,
    train_frac: float = 0.5,
    seed: int = 0,
) -> PerTokenScaling:
    """Does the smaller SAE's error norm predict the larger one's, token by token?  All [n].

    Regresses ||SaeError_j|| on [||SaeError_i||, 1] (plain norms) and, if given, on
    [||SaeError_i||, ||NonlinearError_i||, 1]; both fits use the same split and are scored on
    held-out tokens. `share_removed` is the part of the remaining unexplained variance that the
    nonlinear norm removes.
    """
    a = _as_column("err_norm_i", err_norm_i)
    y = _as_column("err_norm_j", err_norm_j)
    _check_pair("err_norm_i", a, "err_norm_j", y)
    base = linear_error_fit(a, y, train_frac=train_frac, bias=True, seed=seed)
    te = base.test_idx.to(y.device)
    held = {"test_idx": base.test_idx, "pair_without": (y[te, 0], base.predict(a[te])[:, 0])}
    if nonlinear_norm_i is None:
        return PerTokenScaling(base.r2_total_test, None, None, base.n_train, base.n_test, **held)
    b = _as_column("nonlinear_norm_i", nonlinear_norm_i)
    _check_pair("err_norm_i", a, "nonlinear_norm_i", b)
    full = linear_error_fit(torch.cat([a, b], 1), y, bias=True, train_idx=base.train_idx)
    r0, r1 = base.r2_total_test, full.r2_total_test
    share = (r1 - r0) / (1 - r0) if r0 < 1 else float("nan")
    held["pair_with"] = (y[te, 0], full.predict(torch.cat([a, b], 1)[te])[:, 0])
    return PerTokenScaling(r0, r1, share, base.n_train, base.n_test, **held)


# ----------------------------------------------------------------------------- width power law


ArrayLike = Union[Sequence[float], np.ndarray, Tensor]


@dataclass
class PowerLawFit:
    """FVU(W) = c + a * W^m with standard errors (sqrt of curve_fit's covariance diagonal).

    c is the floor that widening the SAE never removes; a > 0, m < 0.
    """

    c: float
    a: float
    m: float
    c_se: float
    a_se: float
    m_se: float

    def predict(self, widths: ArrayLike) -> np.ndarray:
        w = np.asarray(widths, dtype=np.float64)
        return self.c + self.a * w**self.m


def fit_power_law(widths: ArrayLike, fvus: ArrayLike) -> PowerLawFit:
    """Fit FVU(W) = c + a * W^m (a > 0, m < 0, c >= 0) with scipy's curve_fit.

    widths: [k] SAE widths (> 0); fvus: [k]. Needs k >= 3; with exactly 3 points the standard
    errors are inf (no residual degrees of freedom). Widths are rescaled by their smallest
    value inside the fit so that a and m are well conditioned; a and its error are mapped back.
    """
    w = np.asarray(widths, dtype=np.float64).ravel()
    f = np.asarray(fvus, dtype=np.float64).ravel()
    if w.shape != f.shape:
        raise ValueError(f"widths and fvus must have the same length, got {w.size} and {f.size}")
    if w.size < 3:
        raise ValueError(f"need at least 3 (width, fvu) points for 3 parameters, got {w.size}")
    if not (np.isfinite(w).all() and np.isfinite(f).all()):
        raise ValueError("widths and fvus must be finite (no NaN/inf)")
    if (w <= 0).any():
        raise ValueError("widths must be > 0")
    w0 = w.min()
    u = w / w0

    def law(u: np.ndarray, c: float, a0: float, m: float) -> np.ndarray:
        return c + a0 * u**m

    # p0: floor at half the best FVU, then a log-log line through what is above it
    c0 = 0.5 * max(f.min(), 0.0)
    above = np.clip(f - c0, 1e-12, None)
    slope, icpt = np.polyfit(np.log(u), np.log(above), 1) if np.ptp(u) > 0 else (-0.5, np.log(above.mean()))
    p0 = [c0, max(math.exp(icpt), 1e-12), min(slope, -1e-3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)  # pcov = inf with 0 dof is reported below
        popt, pcov = curve_fit(
            law, u, f, p0=p0, bounds=([0.0, 0.0, -np.inf], [np.inf, np.inf, 0.0]), maxfev=20000
        )
    c, a0, m = popt
    a = a0 * w0 ** (-m)
    # delta method for a = a0 * w0^(-m): da = w0^(-m) da0 - a ln(w0) dm
    J = np.array([0.0, w0 ** (-m), -a * math.log(w0)])
    var_a = float(J @ pcov @ J) if np.isfinite(pcov).all() else float("inf")
    se = np.sqrt(np.diag(pcov)) if np.isfinite(pcov).all() else np.full(3, np.inf)
    a_se = math.sqrt(max(var_a, 0.0))
    return PowerLawFit(c=float(c), a=float(a), m=float(m), c_se=float(se[0]), a_se=a_se, m_se=float(se[2]))


# ----------------------------------------------------------------------------- gradient pursuit


@torch.no_grad()
def gradient_pursuit(x: Tensor, W_dec: Tensor, b_dec: Tensor, n_active: int | Tensor) -> Tensor:
    """Inference-time gradient pursuit on an SAE's own decoder (the paper's "better encoder" test).

    x: [n_tokens, d]; W_dec: [n_latents, d] (rows unit norm); b_dec: [d];
    n_active: int or LongTensor [n_tokens], steps per token (the SAE's own L0 on that token).
    Returns codes [n_tokens, n_latents] >= 0; reconstruction = codes @ W_dec + b_dec.

    Each step, as in the authors' code: r = x - b_dec - codes @ W_dec; support = (codes != 0)
    plus argmax(r @ W_dec.T); g = (r @ W_dec.T) on the support; c = g @ W_dec; codes += g *
    <c, r> / <c, c>; clamp codes >= 0. A token stops (is frozen) after n_active[t] steps.
    We follow the authors' code in counting *steps*, not support size: a step may re-pick a
    latent already in the support (likely once the residual is small) or clamp one to zero, so
    the final L0 is <= n_active[t], often below it.

    The same arithmetic, computed sparsely: a token's codes live in one slot per step (latent,
    value; a value clamped to 0 leaves the support, a re-picked latent takes a new slot), so
    codes @ W_dec and g @ W_dec are `embedding_bag`s over at most n_active[t] rows and the only
    dense product per step is r @ W_dec.T; tokens are sorted by n_active so each step works on
    the still-live prefix only. Equal to the dense formulation up to float summation order
    (`bench/bench_pursuit.py`: 4x faster at a fixed L0, ~20x at a JumpReLU's varying one).
    """
    _check_2d("x", x)
    _check_2d("W_dec", W_dec)
    if W_dec.shape[1] != x.shape[1]:
        raise ValueError(f"W_dec must be [n_latents, d={x.shape[1]}], got {tuple(W_dec.shape)}")
    if b_dec.shape != (x.shape[1],) or not torch.isfinite(b_dec).all():
        raise ValueError(f"b_dec must be a finite [d={x.shape[1]}] vector, got shape {tuple(b_dec.shape)}")
    n = x.shape[0]
    steps = torch.as_tensor(n_active, device=x.device)
    if steps.is_floating_point() or steps.ndim > 1 or (steps.ndim == 1 and steps.shape[0] != n):
        raise ValueError(f"n_active must be an int or an integer tensor [n_tokens={n}], got {n_active!r:.60}")
    steps = steps.long().expand(n)
    if (steps < 0).any():
        raise ValueError("n_active must be >= 0")

    dtype = torch.promote_types(x.dtype, W_dec.dtype)
    W = W_dec.to(dtype)
    n_steps = int(steps.max()) if n else 0
    order = steps.argsort(descending=True, stable=True)  # live tokens form a prefix at every step
    live = (steps[order][None, :] > torch.arange(n_steps, device=x.device)[:, None]).sum(1).tolist()
    signal = (x.to(dtype) - b_dec.to(dtype))[order]  # [n, d]
    idx = torch.zeros(n, n_steps, dtype=torch.long, device=x.device)  # [n, steps] slot -> latent
    val = torch.zeros(n, n_steps, dtype=dtype, device=x.device)  # [n, steps] slot -> code (0: out)
    r = signal.clone()  # residual [n, d]
    for t, m in enumerate(live):
        corr = r[:m] @ W.T  # [m, n_latents]; minus the gradient of 0.5 ||r||^2
        pick = corr.argmax(1)
        held = val[:m, :t] != 0  # [m, t] slots in the support
        repick = ((idx[:m, :t] == pick[:, None]) & held).any(1)
        idx[:m, t] = pick
        slots = idx[:m, :t + 1]
        g = corr.gather(1, slots) * torch.cat([held, ~repick[:, None]], 1)  # [m, t + 1]
        c = F.embedding_bag(slots, W, per_sample_weights=g, mode="sum")  # [m, d] = g @ W
        num, den = (c * r[:m]).sum(1), (c * c).sum(1)
        # optimal step along g; den == 0 only when r is orthogonal to the support: stay put
        step_size = torch.where(den > 0, num / den.clamp_min(torch.finfo(dtype).tiny), 0.0)
        val[:m, :t + 1] = (val[:m, :t + 1] + step_size[:, None] * g).clamp_min(0)
        r[:m] = signal[:m] - F.embedding_bag(slots, W, per_sample_weights=val[:m, :t + 1], mode="sum")
    codes = torch.zeros(n, W.shape[0], dtype=dtype, device=x.device)
    codes[order] = codes.scatter_add(1, idx, val)  # a latent's stale slots hold 0
    return codes


# ----------------------------------------------------------------------------- downstream and pursuit


def rows_outside_contexts(context: Tensor, n_contexts: int) -> Tensor:
    """Store tokens a splice of `store.contexts()[:n_contexts]` does not see.

    context: [n] the store's "context" tensor (token t sits in contexts()[context[t]]).
    -> LongTensor [m] of the token indices with context >= n_contexts (fit a LinearError map
    there and it is held out from the spliced tokens).
    """
    if not isinstance(context, Tensor) or context.ndim != 1:
        raise ValueError(f"context must be a 1-D tensor [n_tokens], got {getattr(context, 'shape', context)}")
    if n_contexts < 0:
        raise ValueError(f"n_contexts must be >= 0, got {n_contexts}")
    return (context.long().cpu() >= n_contexts).nonzero().flatten()


def error_replacements(sae: SparseAutoencoder, fit: LinearFit) -> dict[str, Callable[[Tensor, Tensor], Tensor]]:
    """The splices of the downstream test, as `splice.spliced_losses` replacements f(x [n, d], rows).

    "Sae": x -> Sae(x) (the whole SaeError is missing downstream);
    "Sae + LinearError": x -> Sae(x) + x W* (only NonlinearError is missing);
    "Sae + NonlinearError": x -> x - x W* (only LinearError is missing).
    fit: the LinearError map of this SAE (`linear_error_fit(x, x - Sae(x))`, no bias).
    """
    if fit.bias or fit.W.shape != (sae.cfg.d_in, sae.cfg.d_in):
        raise ValueError(f"fit must be a LinearError map [d_in={sae.cfg.d_in}, d_in] without bias, got "
                         f"W {tuple(fit.W.shape)}, bias={fit.bias}")

    @torch.no_grad()
    def sae_out(x: Tensor) -> Tensor:
        sae.eval()
        return sae(x.float().to(sae.W_dec.device))[0].to(x.device)

    def lin(x: Tensor) -> Tensor:
        return fit.predict(x.float())

    return {"Sae": lambda x, rows: sae_out(x).to(x.dtype),
            "Sae + LinearError": lambda x, rows: (sae_out(x) + lin(x)).to(x.dtype),
            "Sae + NonlinearError": lambda x, rows: (x.float() - lin(x)).to(x.dtype)}


def variance_shares(x: Tensor, x_hat: Tensor, fit: LinearFit) -> dict[str, float]:
    """FVU of Sae(x), its nonlinear and linear parts, and each part's share of it.  x, x_hat: [n, d].

    -> fvu, nonlinear_fvu (FVU of Sae + LinearError), linear_fvu (= fvu - nonlinear_fvu),
    nonlinear_share = nonlinear_fvu / fvu, linear_share = linear_fvu / fvu.
    """
    _check_pair("x", x, "x_hat", x_hat)
    f, nl = fvu(x, x_hat), nonlinear_fvu(x, x_hat, fit)
    if not f > 0:
        raise ValueError("the SAE reconstructs x exactly (FVU 0): the shares are undefined")
    return {"fvu": f, "nonlinear_fvu": nl, "linear_fvu": f - nl,
            "nonlinear_share": nl / f, "linear_share": (f - nl) / f}


def pursuit_reconstruct(sae: SparseAutoencoder, x: Tensor, n_active: Tensor, *,
                        max_elements: int = 2**24) -> tuple[Tensor, Tensor]:
    """Re-encode x with `gradient_pursuit` on the SAE's own decoder, in token batches.

    x: [n, d_in]; n_active: LongTensor [n] steps per token (the SAE's own L0, `train.reconstruct`).
    Batches hold max(1, max_elements // n_latents) tokens, bounding the dense [batch, n_latents]
    codes. -> (x_hat [n, d_in] float32 = codes @ W_dec + b_dec, l0 [n] long of the pursuit codes).
    """
    _check_2d("x", x)
    n_active = torch.as_tensor(n_active)
    if n_active.shape != (x.shape[0],):
        raise ValueError(f"n_active must be [n_tokens={x.shape[0]}], got {tuple(n_active.shape)}")
    if max_elements < 1:
        raise ValueError(f"max_elements must be >= 1, got {max_elements}")
    W, b = sae.W_dec.detach().float(), sae.b_dec.detach().float()
    batch = max(1, max_elements // W.shape[0])
    x_hats, l0s = [], []
    for xb, kb in zip(x.split(batch), n_active.split(batch)):
        codes = gradient_pursuit(xb.to(W.device).float(), W, b, kb.to(W.device))
        x_hats.append((codes @ W + b).cpu())
        l0s.append((codes > 0).sum(1).cpu())
    return torch.cat(x_hats), torch.cat(l0s)


# ----------------------------------------------------------------------------- figure helpers


def norm_predictability(x: Tensor, parts: dict[str, Tensor], *, train_frac: float = 0.5,
                        seed: int = 0) -> dict[str, float]:
    """Held-out R^2 of regressing each part's squared norm on [x, 1] (`norm_prediction`).

    x: [n, d]; parts: name -> [n, d_p] per-token vectors (e.g. x, Sae(x), SaeError, LinearError,
    NonlinearError on held-out tokens). Every part uses the same seeded split of the n tokens.
    """
    _check_2d("x", x)
    out = {}
    for name, p in parts.items():
        _check_pair("x", x, name, p, same_width=False)
        out[name] = norm_prediction(x, p.double().pow(2).sum(1), train_frac=train_frac,
                                    seed=seed).r2_total_test
    return out


def width_bands(fvus: ArrayLike, nonlinear_fvus: ArrayLike, c: float) -> dict[str, np.ndarray]:
    """The three stacked bands of the width-scaling figure, per width (our reading of the paper).

    fvus, nonlinear_fvus: [k] FVU of Sae(x) and of Sae(x) + LinearError(x) at k widths; c: the
    floor of the power law FVU(W) = c + a W^m (`fit_power_law`). Returns [k] arrays:
      "nonlinear error"    = nonlinear FVU(W)
      "linear dark matter" = max(c - nonlinear FVU(W), 0)   (below the floor, linearly predictable)
      "absent features"    = max(FVU(W) - max(c, nonlinear FVU(W)), 0)   (what widening removes)
    Stacked in this order they reach max(FVU(W), c, nonlinear FVU(W)).
    """
    f = np.asarray(fvus, dtype=np.float64).ravel()
    nl = np.asarray(nonlinear_fvus, dtype=np.float64).ravel()
    if f.shape != nl.shape:
        raise ValueError(f"fvus and nonlinear_fvus must have the same length, got {f.size} and {nl.size}")
    if not (np.isfinite(f).all() and np.isfinite(nl).all() and math.isfinite(c)):
        raise ValueError("fvus, nonlinear_fvus and c must be finite")
    return {"nonlinear error": nl, "linear dark matter": np.maximum(c - nl, 0.0),
            "absent features": np.maximum(f - np.maximum(c, nl), 0.0)}
