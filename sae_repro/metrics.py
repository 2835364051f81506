"""The one definition of each SAE metric used anywhere in the package.

FVU is the fraction of variance unexplained *around the mean* (not around zero, a known
pitfall in other libraries): sum ||x - x_hat||^2 / sum ||x - mean(x)||^2.
"""

from __future__ import annotations

import torch
from torch import Tensor


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """Fraction of variance unexplained.  x, x_hat: [n_tokens, d]."""
    if x.shape != x_hat.shape:
        raise ValueError(f"fvu: x has shape {tuple(x.shape)} but x_hat has {tuple(x_hat.shape)}")
    x, x_hat = x.double(), x_hat.double()
    resid = (x - x_hat).pow(2).sum()
    total = (x - x.mean(0, keepdim=True)).pow(2).sum()
    return float(resid / total)


def l0(codes: Tensor) -> float:
    """Mean number of active (non-zero) latents per token.  codes: [n_tokens, n_latents]."""
    return float((codes != 0).sum(-1).double().mean())


def feature_density(codes: Tensor) -> Tensor:
    """Fraction of tokens on which each latent fires.  codes: [n_tokens, n_latents] -> [n_latents]."""
    return (codes != 0).double().mean(0)


def dead_fraction(fire_counts: Tensor) -> float:
    """Share of latents that never fired over a window.  fire_counts: [n_latents] counts over the window."""
    return float((fire_counts == 0).double().mean())


def dense_fraction(density: Tensor, threshold: float = 0.1) -> float:
    """Share of latents firing on more than `threshold` of tokens.  density: [n_latents]."""
    return float((density > threshold).double().mean())


def ce_loss_recovered(ce_clean: float, ce_spliced: float, ce_zero: float) -> float:
    """Share of the loss gap closed by the SAE: (L_zero - L_spliced) / (L_zero - L_clean).

    1 = splicing the SAE in costs nothing; 0 = as bad as zero-ablating the activation. NaN if
    zero ablation does not hurt (no gap to recover). Losses: mean next-token CE in nats.
    """
    gap = ce_zero - ce_clean
    return float((ce_zero - ce_spliced) / gap) if gap != 0 else float("nan")


def kl_divergence(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) per position, in nats.  [..., V] -> [...].

    logp: the clean model's log-probabilities, logq: the spliced model's (both log_softmax).
    """
    return (logp.exp() * (logp - logq)).sum(-1)
