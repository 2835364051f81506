"""Training JumpReLU SAEs (Rajamanoharan et al. 2024, "Jumping Ahead"; the Gemma Scope recipe),
the SAE type the Dark Matter paper studied.

A JumpReLU SAE keeps a latent where its pre-activation z exceeds that latent's threshold theta:
f = z * H(z - theta). The loss is the reconstruction error plus lam * L0, L0 = sum_i H(z_i - theta_i).
H has no useful gradient, so theta learns through straight-through estimators with a rectangle
kernel K(u) = 1[|u| < 1/2] of bandwidth eps (the paper's eqs. 11-12, as in SAELens's `Step` and
`JumpReLU` functions):

    d/dtheta H(z - theta)       := -(1 / eps) K((z - theta) / eps)
    d/dtheta [z H(z - theta)]   := -(theta / eps) K((z - theta) / eps)
    d/dz     [z H(z - theta)]    = H(z - theta)      (the L0 term sends nothing to z: DeepMind's
                                                      reading; Anthropic's also passes it to z)

These are the exact derivatives of the objective with H replaced by its kernel-smoothed version
(a linear ramp of width eps) in the L0 term, and to first order in eps in the reconstruction term
(tests/test_jumprelu.py checks both against finite differences). Training applies them sparsely
(`sparse_step`): only the active pairs (z > theta) and the band pairs (abs(z - theta) < eps / 2) carry
gradients, so the encoder matmul is a step's one dense product, as for TopK (`kernels`); the test
file checks that its gradients equal the dense functions'. 3.9x faster than dense autograd on the
default store (8x, batch 1024, 2 AVX2 cores).

Choices, each with its source:
- Thresholds are trained as log(theta) (the paper and Gemma Scope; positivity for free), with
  `threshold_lr_scale` (10) times the learning rate of the other parameters (ours). Adam moves a
  parameter by at most about its lr per step, so at lr 3e-3 a log-threshold moves by <= 0.3% a
  step: over our ~10^3 steps (Gemma Scope: ~10^5) the thresholds could not follow the encoder,
  whose pre-activations shrink early in training, and L0 fell to a third of its target (10.8 for
  a target of 32 on bench_jumprelu.py's store with the dense step; with the 10x lr 34.6, held-out
  FVU 0.248 -> 0.185; with the sparse step, same settings, 34.8 and 0.184: bench/README.md).
  SAELens trains theta directly for the same reason (its issue #494); we keep the log and start
  theta where it matters instead (next).
- Initial thresholds: one value for every latent, the quantile of the initial pre-activations on a
  data sample at which the mean L0 is `init_l0` (default: the target). Ours: the paper starts at
  0.001 on data scaled to E||x||^2 = d and relies on ~10^5 steps to move; we train ~10^3.
- Data scale: training runs on x * s with s = sqrt(d / E||x||^2) (Gemma Scope's normalisation), so
  `bandwidth` (0.001 in the paper, 0.05 in SAELens; ours 0.05, because a wider kernel gives the
  thresholds more gradient in few steps) is in those units; the finished SAE is folded back to raw
  units (W_enc unchanged, b_enc, b_dec and theta divided by s), so it reads raw activations.
- Reconstruction term: squared error summed over d, averaged over tokens, divided by the data's
  per-token variance E||x - mean||^2 (a per-token FVU), so that `l0_coef` means "FVU per active
  latent" at any hook.
- Decoder rows are kept at unit norm (as for the other rules here: codes are comparable across
  types), so the L0 penalty needs no decoder-norm factor. Adam (betas 0.0, 0.999 as Gemma Scope),
  linear lr warm-up and final decay as `train.lr_factor`.
- The L0 coefficient warms up linearly from 0 over the first `l0_warmup` share of the steps (Gemma
  Scope: 10,000 steps). With `target_l0` set, a controller then moves log(lam) by
  `controller_rate` * (L0 / target - 1) per step (ours, in place of a coefficient sweep), so that
  JumpReLU SAEs can be compared with TopK at equal L0; `target_l0=None` keeps lam = `l0_coef`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import pandas as pd
import torch
from torch import Tensor

from sae_repro.kernels import flat_layout, sparse_decode
from sae_repro.metrics import fvu
from sae_repro.sae import SAEConfig, SparseAutoencoder
from sae_repro.train import (
    _check_data,
    _permutation,
    heldout_fvu,
    lr_factor,
    remove_parallel_decoder_grad,
    set_decoder_norm_to_unit,
)


def rectangle(u: Tensor) -> Tensor:
    """K(u) = 1 where abs(u) < 1/2, else 0."""
    return (u.abs() < 0.5).to(u.dtype)


class Step(torch.autograd.Function):
    """H(z - theta) -> [n, L]; the threshold's gradient by the rectangle-kernel estimator."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, theta = ctx.saved_tensors
        g_theta = -(1.0 / ctx.eps) * rectangle((z - theta) / ctx.eps) * grad
        return None, g_theta.sum(0), None


class JumpReLU(torch.autograd.Function):
    """z * H(z - theta) -> [n, L]; z's gradient where kept, theta's by the estimator."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, theta = ctx.saved_tensors
        g_theta = -(theta / ctx.eps) * rectangle((z - theta) / ctx.eps) * grad
        return (z > theta).to(z.dtype) * grad, g_theta.sum(0), None


class _Band(torch.autograd.Function):
    """Zeros [P] at the band pairs p = (token, latent l) with abs(z - theta_l) < eps / 2, whose
    backward is the estimators' threshold gradient, -(scale_p / eps) * grad_p summed per latent:
    scale = theta[l] for JumpReLU (the pairs ride on the decoder), 1 for Step (the L0 count).
    The sparse form of `JumpReLU` / `Step`: only band pairs have a threshold gradient."""

    @staticmethod
    def forward(ctx, theta: Tensor, idx: Tensor, eps: float, times_theta: bool) -> Tensor:
        ctx.save_for_backward(theta, idx)
        ctx.eps, ctx.times_theta = eps, times_theta
        return theta.new_zeros(idx.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        theta, idx = ctx.saved_tensors
        g = grad * (theta[idx] if ctx.times_theta else 1.0)
        return torch.zeros_like(theta).index_add_(0, idx, g, alpha=-1.0 / ctx.eps), None, None, None


def sparse_step(sae: SparseAutoencoder, batch: Tensor, theta: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """One forward of a JumpReLU SAE on batch [B, d] with thresholds theta [L] (differentiable)
    -> (x_hat [B, d], L0 per token averaged [scalar]), with the gradients of `JumpReLU` and
    `Step` (tests/test_jumprelu.py checks them equal) but touching only the active and band
    pairs: the encoder matmul is the step's one dense product, as for TopK (`kernels`)."""
    with torch.no_grad():
        sae.threshold.copy_(theta)
    codes, pre, _ = sae.encode_sparse(batch, validate=False, reuse=True)  # z at z > theta: d/dz = 1
    with torch.no_grad():
        _, b_idx, b_bag, b_off = flat_layout(pre, ((pre - theta).abs_() < eps / 2).view(-1).nonzero().squeeze(1),
                                             is_sorted=True)
    band = _Band.apply(theta, b_idx, eps, True)
    x_hat = sae.decode(codes) + sparse_decode(band, b_idx, b_off, b_bag, sae.W_dec)
    l0 = (codes.idx.numel() + _Band.apply(theta, b_idx, eps, False).sum()) / batch.shape[0]
    return x_hat, l0


@dataclass(frozen=True)
class JumpReLUConfig:
    """How a JumpReLU SAE is trained (see the module docstring for every choice and its source)."""

    expansion: int = 8
    n_latents: int | None = None  # None -> expansion * d_in
    target_l0: float | None = 32.0  # None: fixed coefficient l0_coef
    l0_coef: float = 1e-3  # lam (after warm-up); with a target, the controller's starting value
    l0_warmup: float = 0.1  # share of the steps over which lam rises linearly from 0
    controller_rate: float = 0.05
    init_l0: float | None = None  # None -> target_l0 (or 4 * sqrt(n_latents) without a target)
    bandwidth: float = 0.05  # kernel width eps, in units of the normalised data
    lr: float = 3e-3
    adam_betas: tuple[float, float] = (0.0, 0.999)
    warmup_steps: int | None = None  # None -> min(1000, total // 20)
    decay_fraction: float = 0.2
    batch_size: int = 1024
    epochs: float = 1.0
    max_steps: int | None = None
    seed: int = 0
    log_every: int = 10
    heldout_points: int = 10
    threshold_lr_scale: float = 10.0  # the log-thresholds' lr over `lr` (see the module docstring)

    def __post_init__(self) -> None:
        for name in ("expansion", "batch_size", "log_every", "heldout_points"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"JumpReLUConfig: {name} must be a positive int, got {name}={v!r}")
        for name in ("l0_coef", "bandwidth", "lr", "epochs", "controller_rate", "threshold_lr_scale"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"JumpReLUConfig: {name} must be a finite number > 0, got {name}={v!r}")
        for name in ("target_l0", "init_l0"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"JumpReLUConfig: {name} must be None or a finite number > 0, got {name}={v!r}")
        if not 0.0 <= self.l0_warmup < 1.0:
            raise ValueError(f"JumpReLUConfig: l0_warmup must be in [0, 1), got {self.l0_warmup!r}")


def _scale(x: Tensor) -> float:
    """s with E||x s||^2 = d (Gemma Scope's normalisation)."""
    return math.sqrt(x.shape[1] / float(x.double().pow(2).sum(1).mean()))


def _init_threshold(sae: SparseAutoencoder, x: Tensor, l0: float) -> float:
    """The pre-activation quantile at which the mean L0 on x (normalised) is `l0`."""
    with torch.no_grad():
        z = sae.pre_acts(x).flatten()
    q = 1.0 - min(max(l0 / sae.cfg.n_latents, 1e-6), 1.0)
    return float(torch.quantile(z[torch.randperm(len(z), generator=torch.Generator().manual_seed(0))[:1_000_000]], q))


def train_jumprelu(x: Tensor, cfg: JumpReLUConfig, *, heldout: Tensor | None = None,
                   progress: bool = False) -> tuple[SparseAutoencoder, pd.DataFrame]:
    """Train a JumpReLU SAE on x [n, d_in] -> (SparseAutoencoder with rule "jumprelu", in raw
    units; history with step, tokens, lr, loss, fvu, l0, l0_coef, theta_median, heldout_fvu)."""
    _check_data(x, "x")
    if heldout is not None:
        _check_data(heldout, "heldout")
    n, d = x.shape
    L = cfg.n_latents or cfg.expansion * d
    B = cfg.batch_size
    if B > n:
        raise ValueError(f"batch_size={B} is larger than the {n} training tokens")
    # as `train.train_sae`: whole batches per epoch (the partial last one is dropped)
    total = cfg.max_steps or max(1, int(cfg.epochs * (n // B)))
    warm = cfg.warmup_steps if cfg.warmup_steps is not None else min(1000, total // 20)
    s = _scale(x)
    var = float((x.double() * s - (x.double() * s).mean(0)).pow(2).sum(1).mean())  # E||x - mean||^2
    sae = SparseAutoencoder(SAEConfig(d_in=d, n_latents=L, rule="jumprelu", k=min(32, L)), seed=cfg.seed)
    sample = x[torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))[:4096]].float() * s
    with torch.no_grad():
        sae.b_dec.copy_(sample.mean(0))
    init_l0 = cfg.init_l0 or cfg.target_l0 or 4 * math.sqrt(L)
    log_theta = torch.nn.Parameter(torch.full((L,), math.log(max(_init_threshold(sae, sample, init_l0), 1e-6))))
    params = [{"params": [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec], "scale": 1.0},
              {"params": [log_theta], "scale": cfg.threshold_lr_scale}]
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=cfg.adam_betas)
    lam, rows, t0 = cfg.l0_coef, [], time.perf_counter()
    # on the logging grid, so every held-out row also carries the logged training metrics
    heldout_every = cfg.log_every * max(1, round(total / cfg.heldout_points / cfg.log_every))
    step, epoch = 0, 0
    while step < total:
        order = _permutation(n, cfg.seed, epoch)
        for i in range(0, n - B + 1, B):
            if step >= total:
                break
            batch = x[order[i:i + B]].float() * s
            for g in opt.param_groups:
                g["lr"] = g["scale"] * cfg.lr * lr_factor(step, total, warm, cfg.decay_fraction)
            theta = log_theta.exp()
            x_hat, l0 = sparse_step(sae, batch, theta, cfg.bandwidth)
            recon = (batch - x_hat).pow(2).sum(1).mean() / var
            ramp = min(1.0, step / (cfg.l0_warmup * total)) if cfg.l0_warmup > 0 else 1.0
            loss = recon + ramp * lam * l0
            opt.zero_grad(set_to_none=True)
            loss.backward()
            remove_parallel_decoder_grad(sae)
            opt.step()
            set_decoder_norm_to_unit(sae)
            if cfg.target_l0 is not None and ramp >= 1.0:  # the controller, once lam is fully on
                lam *= math.exp(cfg.controller_rate * (float(l0.detach()) / cfg.target_l0 - 1.0))
            step += 1
            if step % cfg.log_every == 0 or step == total:
                row = {"step": step, "tokens": step * B, "lr": opt.param_groups[0]["lr"],
                       "loss": float(loss.detach()), "fvu": fvu(batch, x_hat.detach()), "l0": float(l0.detach()),
                       "l0_coef": lam * ramp, "theta_median": float(theta.detach().median()) / s,
                       "tokens_per_s": step * B / (time.perf_counter() - t0)}
                if heldout is not None and (step % heldout_every == 0 or step == total):
                    row["heldout_fvu"] = heldout_fvu(_folded(sae, log_theta, s), heldout, 4096)
                rows.append(row)
                if progress:
                    print(f"jumprelu step {step}/{total}: fvu {row['fvu']:.3f} l0 {row['l0']:.1f}", flush=True)
        epoch += 1
    return _folded(sae, log_theta, s), pd.DataFrame(rows)


def _folded(sae: SparseAutoencoder, log_theta: Tensor, s: float) -> SparseAutoencoder:
    """A copy of `sae` (trained on x * s) that reads raw x: W_enc, W_dec unchanged; b_enc, b_dec and
    the thresholds divided by s, so its codes are the normalised codes / s and x_hat = x_hat_n / s."""
    out = SparseAutoencoder(sae.cfg, seed=0)
    with torch.no_grad():
        out.W_enc.copy_(sae.W_enc)
        out.W_dec.copy_(sae.W_dec)
        out.b_enc.copy_(sae.b_enc / s)
        out.b_dec.copy_(sae.b_dec / s)
        out.threshold.copy_(log_theta.exp() / s)
    return out.eval()


# bumped when training changes what a config gives (it is in the SAE cache key);
# 2: steps = epochs * whole batches per epoch, as train_sae (was epochs * n / batch_size)
TRAINER_VERSION = 2


def config_dict(cfg: JumpReLUConfig) -> dict:
    """The config as a JSON-able dict (for cache keys and figure CSVs)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
