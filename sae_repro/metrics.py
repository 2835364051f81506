"""The one definition of each SAE metric used anywhere in the package.

FVU is the fraction of variance unexplained *around the mean* (not around zero, a known
pitfall in other libraries): sum ||x - x_hat||^2 / sum ||x - mean(x)||^2.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from sae_repro.sparsity import feature_choice, mutual_choice

if TYPE_CHECKING:
    from sae_repro.sae import SparseAutoencoder


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """Fraction of variance unexplained.  x, x_hat: [n_tokens, d].

    Raises ValueError on inputs where it is undefined: shapes that differ, no tokens, NaN or inf
    in either, or an x without variance (every token the same: nothing to explain)."""
    if x.shape != x_hat.shape:
        raise ValueError(f"fvu: x has shape {tuple(x.shape)} but x_hat has {tuple(x_hat.shape)}")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"fvu: x must hold at least one token, got shape {tuple(x.shape)}")
    x, x_hat = x.double(), x_hat.double()
    resid = (x - x_hat).pow(2).sum()
    total = (x - x.mean(0, keepdim=True)).pow(2).sum()
    if not bool(torch.isfinite(resid)):  # one pass: a NaN or inf anywhere makes the sum non-finite
        bad = "x" if not bool(torch.isfinite(x).all()) else "x_hat"
        raise ValueError(f"fvu: {bad} contains NaN or inf values; only finite values are allowed")
    if not total > 0:
        raise ValueError(f"fvu: x has zero variance over its {x.shape[0]} tokens: the FVU is undefined")
    return float(resid / total)


def _check_codes(name: str, codes: Tensor) -> None:
    """codes [n_tokens, n_latents] with at least one token and no NaN (a NaN would count as active)."""
    if codes.ndim != 2 or codes.shape[0] == 0:
        raise ValueError(f"{name}: codes must be [n_tokens >= 1, n_latents], got shape {tuple(codes.shape)}")
    if codes.is_floating_point() and bool(torch.isnan(codes).any()):
        raise ValueError(f"{name}: codes contain NaN values")


def l0(codes: Tensor) -> float:
    """Mean number of active (non-zero) latents per token.  codes: [n_tokens, n_latents]."""
    _check_codes("l0", codes)
    return float((codes != 0).sum(-1).double().mean())


def feature_density(codes: Tensor) -> Tensor:
    """Fraction of tokens on which each latent fires.  codes: [n_tokens, n_latents] -> [n_latents]."""
    _check_codes("feature_density", codes)
    return (codes != 0).double().mean(0)


def dead_fraction(fire_counts: Tensor) -> float:
    """Share of latents that never fired over a window.  fire_counts: [n_latents] counts over the window."""
    if fire_counts.numel() == 0:
        raise ValueError("dead_fraction: fire_counts is empty (an SAE has at least one latent)")
    return float((fire_counts == 0).double().mean())


def dense_fraction(density: Tensor, threshold: float = 0.1) -> float:
    """Share of latents firing on more than `threshold` of tokens.  density: [n_latents]."""
    return float((density > threshold).double().mean())


def ce_loss_recovered(ce_clean: float, ce_spliced: float, ce_zero: float) -> float:
    """Share of the loss gap closed by the SAE: (L_zero - L_spliced) / (L_zero - L_clean).

    1 = splicing the SAE in costs nothing; 0 = as bad as zero-ablating the activation. NaN if
    zero ablation does not hurt (no gap to recover). Losses: mean next-token CE in nats.
    """
    if not all(math.isfinite(v) for v in (ce_clean, ce_spliced, ce_zero)):
        raise ValueError(f"ce_loss_recovered: losses must be finite, got clean={ce_clean}, "
                         f"spliced={ce_spliced}, zero={ce_zero}")
    gap = ce_zero - ce_clean
    return float((ce_zero - ce_spliced) / gap) if gap != 0 else float("nan")


def kl_divergence(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) per position, in nats.  [..., V] -> [...].

    logp: the clean model's log-probabilities, logq: the spliced model's (both log_softmax).
    """
    return (logp.exp() * (logp - logq)).sum(-1)


INFERENCE_MODES = ("threshold", "batch")


@torch.no_grad()
def latents_per_token(sae: "SparseAutoencoder", x: Tensor, *, inference: str = "threshold",
                      batch_size: int = 4096) -> Tensor:
    """Number of active (non-zero) latents of each token.  x: [n, d_in] -> LongTensor [n'].

    inference="threshold": the SAE's eval-mode output (Mutual / Feature Choice keep the entries
    above their learned threshold; token-wise rules as always); n' = n.
    inference="batch": the batch rule itself on consecutive batches of `batch_size` tokens of x
    (Mutual Choice: top k*batch_size of the batch; Feature Choice: each latent's top-m tokens),
    as in training; the last partial batch is dropped, so n' = (n // batch_size) * batch_size.
    For a token-wise rule (topk, gradient_topk without gradients) both modes agree.
    The SAE's threshold is not updated.
    """
    if inference not in INFERENCE_MODES:
        raise ValueError(f"latents_per_token: inference={inference!r}; allowed: {INFERENCE_MODES}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"latents_per_token: batch_size must be a positive int, got {batch_size!r}")
    if x.ndim != 2 or x.shape[1] != sae.cfg.d_in:
        raise ValueError(f"latents_per_token: x must be [n, d_in={sae.cfg.d_in}], got {tuple(x.shape)}")
    n = x.shape[0]
    if inference == "batch":
        if n < batch_size:
            raise ValueError(f"latents_per_token: inference='batch' needs at least batch_size={batch_size} "
                             f"tokens, got {n}")
        n = n // batch_size * batch_size
    was_training, dev = sae.training, sae.W_dec.device
    sae.eval()
    try:
        counts = []
        for i in range(0, n, batch_size):
            xb = x[i:min(i + batch_size, n)].to(dev).float()
            if inference == "batch" and sae.cfg.rule == "mutual_choice":
                codes = mutual_choice(sae.pre_acts(xb), sae.cfg.k)
            elif inference == "batch" and sae.cfg.rule == "feature_choice":
                codes = feature_choice(sae.pre_acts(xb), sae.capacities(len(xb)))
            else:
                codes = sae.encode(xb)
            counts.append((codes != 0).sum(-1).cpu())
    finally:
        sae.train(was_training)
    return torch.cat(counts)


def interp_log_l0(l0_ref: np.ndarray | list[float], y_ref: np.ndarray | list[float],
                  l0: np.ndarray | list[float] | float, *, max_ratio: float = 1.0) -> np.ndarray:
    """A reference curve y(L0) read at other L0s, linear in log L0.  -> float64 array like l0.

    l0_ref, y_ref: [m] points of the reference curve (e.g. TopK SAEs at several k), any order,
    L0 > 0; l0: the L0s to read it at. Inside [min l0_ref, max l0_ref] the curve is interpolated
    linearly in log L0; up to a factor `max_ratio` beyond either end it is extrapolated along
    the end segment; further out the result is NaN (max_ratio=1: no extrapolation).
    """
    ref_x = np.log(np.asarray(l0_ref, dtype=np.float64))
    ref_y = np.asarray(y_ref, dtype=np.float64)
    q = np.asarray(l0, dtype=np.float64)
    if ref_x.ndim != 1 or ref_x.shape != ref_y.shape or ref_x.size < 2:
        raise ValueError(f"interp_log_l0: l0_ref and y_ref must be 1-d of the same length >= 2, "
                         f"got {np.shape(l0_ref)} and {np.shape(y_ref)}")
    if not (np.isfinite(ref_x).all() and np.isfinite(ref_y).all()) or (q <= 0).any():
        raise ValueError("interp_log_l0: l0_ref and l0 must be > 0 and y_ref finite")
    if not max_ratio >= 1.0:
        raise ValueError(f"interp_log_l0: max_ratio must be >= 1, got {max_ratio!r}")
    order = np.argsort(ref_x)
    ref_x, ref_y = ref_x[order], ref_y[order]
    if np.unique(ref_x).size != ref_x.size:
        raise ValueError(f"interp_log_l0: l0_ref has repeated values {np.asarray(l0_ref).tolist()}")
    qx = np.log(q)
    out = np.interp(qx, ref_x, ref_y)
    lo, hi = qx < ref_x[0], qx > ref_x[-1]
    slope_lo = (ref_y[1] - ref_y[0]) / (ref_x[1] - ref_x[0])
    slope_hi = (ref_y[-1] - ref_y[-2]) / (ref_x[-1] - ref_x[-2])
    out = np.where(lo, ref_y[0] + slope_lo * (qx - ref_x[0]), out)
    out = np.where(hi, ref_y[-1] + slope_hi * (qx - ref_x[-1]), out)
    too_far = (qx < ref_x[0] - np.log(max_ratio)) | (qx > ref_x[-1] + np.log(max_ratio))
    return np.where(too_far, np.nan, out)
