"""Training losses: reconstruction, AuxK (OpenAI TopK paper) and our reading of aux_zipf_loss.

All losses are differentiable scalars. The auxiliary losses take the encoder pre-activations
`pre: [n, n_latents]` either with autograd (the dense reference path: each token's top k_aux
dead / underused latents are decoded with one matmul on the pool's decoder rows, under bf16
autocast if `autocast`) or detached together with `pre_pairs(latents [n, j]) -> SparseCodes`
with autograd (from `encode_sparse`): the top k_aux are chosen on the detached pre and only those
n * k_aux pairs are trained, through the sparse kernels, as the forward's own codes are. Same
loss and gradient; the sparse path never forms the [n, n_pool] block with autograd.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from sae_repro.kernels import SparseCodes, sparse_decode


def mse(x: Tensor, x_hat: Tensor, normalize: bool = True) -> Tensor:
    """Reconstruction loss.  x, x_hat: [n, d].

    normalize=True (the training loss, as in sparsify): sum ||x - x_hat||^2 / sum ||x - mean(x)||^2
    over the batch -- the value of `metrics.fvu` on the batch, but a differentiable tensor; it
    makes the loss, hence the learning rate, independent of the activations' scale.
    normalize=False: squared error summed over dims, averaged over tokens (SAELens' mse_loss).
    """
    if x.shape != x_hat.shape:
        raise ValueError(f"mse: x has shape {tuple(x.shape)} but x_hat has {tuple(x_hat.shape)}")
    err = (x - x_hat).pow(2).sum()
    if normalize:
        return err / (x - x.mean(0, keepdim=True)).pow(2).sum().clamp_min(1e-12)
    return err / x.shape[0]


def _check_aux(x: Tensor, x_hat: Tensor, pre: Tensor, W_dec: Tensor, k_aux: int | None, fn: str) -> int:
    if x.shape != x_hat.shape or x.ndim != 2:
        raise ValueError(f"{fn}: x and x_hat must be [n, d] of the same shape, "
                         f"got {tuple(x.shape)}, {tuple(x_hat.shape)}")
    if pre.ndim != 2 or pre.shape[0] != x.shape[0] or pre.shape[1] != W_dec.shape[0]:
        raise ValueError(f"{fn}: pre must be [n_tokens={x.shape[0]}, n_latents={W_dec.shape[0]}], "
                         f"got {tuple(pre.shape)}")
    k_aux = x.shape[1] // 2 if k_aux is None else k_aux
    if isinstance(k_aux, bool) or not isinstance(k_aux, int) or k_aux < 1:
        raise ValueError(f"{fn}: k_aux must be a positive int (default d_in // 2), got k_aux={k_aux!r}")
    return k_aux


def _aux_reconstruction(x: Tensor, x_hat: Tensor, pre: Tensor, pool: Tensor, weight: Tensor | None,
                        W_dec: Tensor, k_aux: int, pre_pairs: Callable[[Tensor], SparseCodes] | None,
                        autocast: bool) -> Tensor:
    """||e - e_hat||^2 / ||e - mean(e)||^2, e = x - x_hat (detached), e_hat from each token's top
    min(k_aux, |pool|) pre-activations among the latents in `pool` [n_pool] (relu'd, times
    weight[latent] if given), decoded by W_dec without b_dec."""
    e = (x - x_hat).detach()
    block = pre[:, pool]  # [n, n_pool]
    top = block.detach().topk(min(k_aux, pool.numel()), dim=-1, sorted=False).indices  # [n, j] into pool
    if pre_pairs is not None:
        codes = pre_pairs(pool[top])
        vals = codes.vals if weight is None else codes.vals * weight[codes.idx]
        e_hat = sparse_decode(vals, codes.idx, codes.offsets, codes.bag, W_dec)
    else:
        keep = torch.zeros(block.shape, dtype=torch.bool, device=block.device).scatter_(1, top, True)
        dense = torch.where(keep, block.relu(), 0.0)
        if weight is not None:
            dense = dense * weight[pool]
        with torch.autocast(dense.device.type, dtype=torch.bfloat16, enabled=autocast):
            e_hat = dense @ W_dec[pool]
    return (e - e_hat.float()).pow(2).sum() / (e - e.mean(0, keepdim=True)).pow(2).sum().clamp_min(1e-12)


def aux_k_loss(x: Tensor, x_hat: Tensor, pre: Tensor, dead_mask: Tensor, W_dec: Tensor,
               k_aux: int | None = None, *, pre_pairs: Callable[[Tensor], SparseCodes] | None = None,
               autocast: bool = False) -> Tensor:
    """AuxK (Gao et al. 2024, OpenAI TopK paper; scaling as in sparsify).

    x, x_hat: [n, d]; pre: [n, n_latents]; dead_mask: bool [n_latents]; W_dec: [n_latents, d].
    e = x - x_hat (detached); e_hat = relu(top-k_aux pre among dead latents) @ W_dec (no b_dec);
    loss = min(n_dead / k_aux, 1) * ||e - e_hat||^2 / ||e - mean(e)||^2   (sums over the batch).
    k_aux defaults to d // 2 and is capped at n_dead. Zero (a tensor) if no latent is dead.
    It trains the dead latents to explain what the live ones miss, so they start firing again.
    Two choices to know: the values are relu'd (OpenAI; sparsify keeps the raw, possibly
    negative, pre-activations), so a dead latent whose pre is never positive gets no gradient;
    and the loss is normalised by the variance of e (sparsify divides by the variance of x).
    """
    k_aux = _check_aux(x, x_hat, pre, W_dec, k_aux, "aux_k_loss")
    if dead_mask.shape != (W_dec.shape[0],) or dead_mask.dtype != torch.bool:
        raise ValueError(f"aux_k_loss: dead_mask must be a bool tensor [n_latents={W_dec.shape[0]}], "
                         f"got {dead_mask.dtype} {tuple(dead_mask.shape)}")
    pool = dead_mask.nonzero().squeeze(1)
    if pool.numel() == 0:
        return x_hat.new_zeros(())
    scale = min(pool.numel() / k_aux, 1.0)
    return scale * _aux_reconstruction(x, x_hat, pre, pool, None, W_dec, k_aux, pre_pairs, autocast)


def zipf_target_density(density: Tensor, fit_ranks: tuple[int, int] | None = None) -> Tensor:
    """Each latent's target density from a Zipf fit to the current densities.  [L] -> [L].

    Sort densities descending (rank r = 1..L, ties by latent index); fit
    log density = log C - s log r by least squares over the ranks with density > 0 (restricted to
    `fit_ranks` = (first, last) 1-based ranks if given); latent at rank r gets C r^-s.
    With fewer than two positive densities there is nothing to fit: the targets are all 0.
    """
    L = density.numel()
    order = density.double().sort(descending=True, stable=True)
    ranks = torch.arange(1, L + 1, dtype=torch.float64)
    use = order.values > 0
    if fit_ranks is not None:
        lo, hi = fit_ranks
        if not 1 <= lo < hi <= L:
            raise ValueError(f"zipf_target_density: fit_ranks must satisfy 1 <= first < last <= {L}, got {fit_ranks}")
        use &= (ranks >= lo) & (ranks <= hi)
    if int(use.sum()) < 2:
        return torch.zeros(L, dtype=density.dtype)
    lx, ly = ranks[use].log(), order.values[use].log()
    slope = ((lx - lx.mean()) * (ly - ly.mean())).sum() / (lx - lx.mean()).pow(2).sum()
    target_sorted = (ly.mean() + slope * (ranks.log() - lx.mean())).exp()
    return torch.empty(L, dtype=torch.float64).scatter_(0, order.indices, target_sorted).to(density.dtype)


def aux_zipf_loss(x: Tensor, x_hat: Tensor, pre: Tensor, density: Tensor, W_dec: Tensor,
                  k_aux: int | None = None, *, underused_fraction: float = 0.5,
                  target: Tensor | None = None, dead_mask: Tensor | None = None,
                  pre_pairs: Callable[[Tensor], SparseCodes] | None = None, autocast: bool = False) -> Tensor:
    """AuxK generalised to dead *and underused* latents (our reading; the formula is not public).

    density: [L] running feature densities (fraction of tokens each latent fires on).
    target:  [L] target densities; default `zipf_target_density(density)` -- a Zipf curve fitted
             to the sorted densities, each latent getting the value at its current rank.
    underused: density_j < underused_fraction * target_j, plus every latent in `dead_mask`.
    deficit:   w_j = clip(1 - density_j / target_j, 0, 1), and w_j = 1 for dead latents.
    loss = min(n_underused / k_aux, 1) * ||e - e_hat||^2 / ||e - mean(e)||^2 with
           e_hat = sum over each token's top-k_aux pre among underused latents of
                   w_j relu(pre_j) W_dec[j]     (e = x - x_hat detached, no b_dec).
    The deficit weight makes a latent far below its Zipf target take a larger share of the
    error (and its gradient) than one just below it. With underused_fraction=0 only dead latents
    take part, all with weight 1: exactly `aux_k_loss`. Zero if no latent is underused.
    """
    k_aux = _check_aux(x, x_hat, pre, W_dec, k_aux, "aux_zipf_loss")
    L = W_dec.shape[0]
    if not (math.isfinite(underused_fraction) and underused_fraction >= 0):
        raise ValueError(f"aux_zipf_loss: underused_fraction must be a finite float >= 0, got {underused_fraction!r}")
    if density.shape != (L,):
        raise ValueError(f"aux_zipf_loss: density must be [n_latents={L}], got {tuple(density.shape)}")
    density = density.detach().float()
    target = zipf_target_density(density) if target is None else target.detach().float()
    if target.shape != (L,):
        raise ValueError(f"aux_zipf_loss: target must be [n_latents={L}], got {tuple(target.shape)}")
    under = density < underused_fraction * target
    weight = torch.where(target > 0, 1 - density / target.clamp_min(1e-30), 0.0).clamp(0, 1)
    if dead_mask is not None:
        under |= dead_mask
        weight = torch.where(dead_mask, 1.0, weight)
    pool = under.nonzero().squeeze(1)
    if pool.numel() == 0:
        return x_hat.new_zeros(())
    scale = min(pool.numel() / k_aux, 1.0)
    return scale * _aux_reconstruction(x, x_hat, pre, pool, weight.to(W_dec.dtype), W_dec, k_aux, pre_pairs, autocast)
