"""Sparsity (selection) rules of the SAEs: which latents a token keeps.

Every rule is a plain function of the encoder pre-activations `pre: [n_tokens, n_latents]` and
returns `codes` of the same shape: kept entries carry `relu(pre)`, all others are exactly 0. A
kept entry whose pre-activation is <= 0 therefore also reads 0, so L0 can fall below the budget.
Gradients flow to `pre` at kept entries (the selection itself is not differentiable).

The rules, seen as allocating a budget of token-latent matches (Ayonrinde 2024):
- `topk`            token choice: each token keeps its k largest.                  budget k per token
- `mutual_choice`   one top-(k * n_tokens) over the whole batch (= BatchTopK).     budget k*n_tokens
- `feature_choice`  each latent keeps its m largest tokens (or m[j] for latent j). budget m per latent
- `gradient_topk`   g-SAE: TopK on `pre + beta * pre * |latent_grad|`, values relu(pre).
- `jumprelu`        keep pre > threshold (fixed or learned threshold).
- `relu`            keep everything positive (the classic L1 SAE).

Mutual and Feature Choice depend on the batch; at inference on single tokens use
`threshold_select` with a threshold learned during training by `ThresholdEMA`.

Validation (shape, dtype, NaN/inf, parameter ranges) is on by default and costs one reduction
(plus a host sync on GPU); pass `validate=False` in hot loops once the inputs are trusted.
"""

from __future__ import annotations

import math
import operator
from typing import Callable

import torch
from torch import Tensor, nn

# ----------------------------------------------------------------------------- validation


def _check_pre(pre: Tensor, fn: str) -> None:
    if not isinstance(pre, Tensor):
        raise TypeError(f"{fn}: pre must be a torch.Tensor [n_tokens, n_latents], got {type(pre).__name__}")
    if pre.ndim != 2:
        raise ValueError(f"{fn}: pre must be 2-D [n_tokens, n_latents], got shape {tuple(pre.shape)} "
                         f"(flatten batch and position dims first)")
    if not pre.is_floating_point():
        raise TypeError(f"{fn}: pre must be a floating tensor, got dtype {pre.dtype}")
    if not bool(torch.isfinite(pre).all()):
        raise ValueError(f"{fn}: pre contains NaN or inf values; only finite pre-activations are allowed")


def _as_int(value: object, name: str, fn: str) -> int:
    if isinstance(value, bool):  # bool is an int subclass; True as k is a bug, not a 1
        raise TypeError(f"{fn}: {name} must be an int, got bool {value}")
    try:
        return operator.index(value)  # accepts int, numpy ints, 0-d integer tensors
    except TypeError:
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__} {value!r}") from None


def _check_k(k: object, n_latents: int, fn: str) -> int:
    k = _as_int(k, "k", fn)
    if k < 1:
        raise ValueError(f"{fn}: k must be an int in 1..n_latents={n_latents}, got k={k}")
    if k > n_latents:
        raise ValueError(f"{fn}: k={k} is larger than the number of latents n_latents={n_latents}")
    return k


def _check_threshold(threshold: float | Tensor, n_latents: int, fn: str) -> None:
    if isinstance(threshold, Tensor):
        if threshold.ndim != 0 and tuple(threshold.shape) != (n_latents,):
            raise ValueError(f"{fn}: threshold must be a scalar or have shape [n_latents]=({n_latents},), "
                             f"got shape {tuple(threshold.shape)}")
        if bool(torch.isnan(threshold).any()):
            raise ValueError(f"{fn}: threshold contains NaN")
    elif not isinstance(threshold, (int, float)) or math.isnan(threshold):
        raise ValueError(f"{fn}: threshold must be a real number or a [n_latents] tensor, got {threshold!r}")


# ----------------------------------------------------------------------------- rules


def topk(pre: Tensor, k: int, validate: bool = True) -> Tensor:
    """Token choice: each token keeps its k largest pre-activations.  pre: [n_tokens, n_latents].

    Ties are broken by torch.topk (deterministic for a given device); exactly k entries are kept.
    """
    if validate:
        _check_pre(pre, "topk")
        k = _check_k(k, pre.shape[-1], "topk")
    vals, idx = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())


def mutual_choice(pre: Tensor, k: int, validate: bool = True) -> Tensor:
    """Mutual Choice (= BatchTopK): one top-M over the flattened batch, M = k * n_tokens.

    pre: [n_tokens, n_latents]. Tokens compete for the shared budget, so one token may get many
    latents and another none; k is the *average* number kept per token.
    """
    if validate:
        _check_pre(pre, "mutual_choice")
        k = _check_k(k, pre.shape[-1], "mutual_choice")
    flat = pre.reshape(-1)
    vals, idx = flat.topk(k * pre.shape[0], sorted=False)
    return torch.zeros_like(flat).scatter_(0, idx, vals.relu()).view_as(pre)


def _check_capacity(m: int | Tensor, n_tokens: int, n_latents: int, fn: str) -> int | Tensor:
    if isinstance(m, Tensor) and m.ndim == 1:
        if tuple(m.shape) != (n_latents,):
            raise ValueError(f"{fn}: per-latent capacities m must have shape [n_latents]=({n_latents},), "
                             f"got shape {tuple(m.shape)}")
        if m.is_floating_point() or m.dtype == torch.bool:
            raise TypeError(f"{fn}: per-latent capacities m must be an integer tensor, got dtype {m.dtype}")
        if m.numel() and int(m.min()) < 0:
            raise ValueError(f"{fn}: per-latent capacities m must be >= 0, got min(m)={int(m.min())}")
        return m
    m = _as_int(m, "m", fn)
    if m < 1:
        raise ValueError(f"{fn}: m must be an int in 1..n_tokens={n_tokens}, got m={m}")
    if m > n_tokens:
        raise ValueError(f"{fn}: m={m} is larger than the number of tokens in the batch n_tokens={n_tokens}")
    return m


def feature_choice(pre: Tensor, m: int | Tensor, validate: bool = True) -> Tensor:
    """Feature Choice: each latent keeps its m largest tokens in the batch.  pre: [n_tokens, n_latents].

    m: an int (uniform capacity, typically k * n_tokens // n_latents) or a LongTensor [n_latents]
    of per-latent capacities (e.g. `zipf_capacities`); capacities above n_tokens are clamped to
    n_tokens (a latent cannot take more tokens than the batch has), 0 means the latent never fires.
    """
    n_tokens, n_latents = pre.shape
    if validate:
        _check_pre(pre, "feature_choice")
        m = _check_capacity(m, n_tokens, n_latents, "feature_choice")
    if not isinstance(m, Tensor) or m.ndim == 0:
        vals, idx = pre.topk(int(m), dim=0, sorted=False)
        return torch.zeros_like(pre).scatter_(0, idx, vals.relu())
    m = m.to(pre.device).clamp(max=n_tokens)
    m_max = int(m.max()) if m.numel() else 0
    if m_max == 0:
        return torch.zeros_like(pre)
    vals, idx = pre.topk(m_max, dim=0, sorted=True)  # sorted: row r holds each latent's rank-r token
    keep = torch.arange(m_max, device=pre.device)[:, None] < m[None, :]  # [m_max, n_latents]
    return torch.zeros_like(pre).scatter_(0, idx, torch.where(keep, vals.relu(), 0.0))


def zipf_capacities(n_latents: int, total_budget: int, exponent: float = 1.0,
                    max_capacity: int | None = None) -> Tensor:
    """Zipf-shaped per-latent capacities for `feature_choice` -> LongTensor [n_latents].

    Our reading (the paper says capacities follow a Zipf curve but does not pin the formula):
    latent j (rank r = j + 1, so latent 0 is rank 1) gets capacity proportional to r^-exponent,
    with each capacity clamped to [1, max_capacity] and the scale solved so that the total is
    exactly `total_budget` (integer rounding by largest remainder, which keeps them non-increasing).
    When total_budget < n_latents every latent still gets 1; when it exceeds
    n_latents * max_capacity every latent gets max_capacity. Pass max_capacity = n_tokens so the
    mass the head latents cannot use is handed to the tail instead of being clamped away.
    exponent=0 gives uniform capacities.
    """
    n_latents = _as_int(n_latents, "n_latents", "zipf_capacities")
    total_budget = _as_int(total_budget, "total_budget", "zipf_capacities")
    if n_latents < 1 or total_budget < 1:
        raise ValueError(f"zipf_capacities: n_latents and total_budget must be >= 1, "
                         f"got n_latents={n_latents}, total_budget={total_budget}")
    if not (math.isfinite(exponent) and exponent >= 0):
        raise ValueError(f"zipf_capacities: exponent must be a finite float >= 0, got exponent={exponent}")
    hi = math.inf if max_capacity is None else _as_int(max_capacity, "max_capacity", "zipf_capacities")
    if hi < 1:
        raise ValueError(f"zipf_capacities: max_capacity must be >= 1, got max_capacity={max_capacity}")
    if total_budget <= n_latents:
        return torch.ones(n_latents, dtype=torch.long)
    if total_budget >= n_latents * hi:
        return torch.full((n_latents,), int(hi), dtype=torch.long)

    w = torch.arange(1, n_latents + 1, dtype=torch.float64).pow(-exponent)

    def caps(c: float) -> Tensor:
        return (c * w).clamp(1.0, hi)

    lo_c, hi_c = 0.0, total_budget / float(w.min())  # sum(caps(hi_c)) >= total_budget
    for _ in range(100):  # bisection on the scale; sum(caps(c)) is monotone in c
        mid = 0.5 * (lo_c + hi_c)
        lo_c, hi_c = (mid, hi_c) if float(caps(mid).sum()) < total_budget else (lo_c, mid)
    exact = caps(hi_c)
    out = exact.floor()
    short = total_budget - int(out.sum())
    frac = torch.where(out < hi, exact - out, -1.0)  # entries at max_capacity cannot take more
    order = frac.sort(descending=True, stable=True).indices  # stable: ties go to the lower rank
    out[order[:max(short, 0)]] += 1
    return out.long()


def gradient_topk(pre: Tensor, latent_grad: Tensor, k: int, beta: float, validate: bool = True) -> Tensor:
    """g-SAE selection: TopK on the score `pre + beta * pre * |latent_grad|`; values are relu(pre).

    pre, latent_grad: [n_tokens, n_latents]. latent_grad is the per-token gradient of the
    next-token loss wrt the hooked activation, projected on the decoder rows (grad_x @ W_dec.T).
    It only steers which latents are kept, the kept values are relu(pre) (our reading of Olmo et
    al. 2024). A negative pre gets a *lower* score from a large gradient, as the formula says.
    beta = 0 is exactly `topk`.
    """
    if validate:
        _check_pre(pre, "gradient_topk")
        k = _check_k(k, pre.shape[-1], "gradient_topk")
        if not isinstance(latent_grad, Tensor) or latent_grad.shape != pre.shape:
            got = tuple(latent_grad.shape) if isinstance(latent_grad, Tensor) else type(latent_grad).__name__
            raise ValueError(f"gradient_topk: latent_grad must have pre's shape {tuple(pre.shape)}, got {got}")
        if not bool(torch.isfinite(latent_grad).all()):
            raise ValueError("gradient_topk: latent_grad contains NaN or inf values")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (math.isfinite(beta) and beta >= 0):
            raise ValueError(f"gradient_topk: beta must be a finite float >= 0, got beta={beta!r}")
    # pre * (1 + beta|g|) == pre + beta*pre*|g|; detached since only the indices are used
    score = pre.detach() * (1 + beta * latent_grad.detach().abs())
    idx = score.topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(pre).scatter_(-1, idx, pre.gather(-1, idx).relu())


def threshold_select(pre: Tensor, threshold: float | Tensor, validate: bool = True) -> Tensor:
    """Keep entries with pre > threshold, values relu(pre).  threshold: scalar or [n_latents].

    The inference rule for the batch-dependent Mutual and Feature Choice (threshold from
    `ThresholdEMA`). An inf threshold means the latent never fires.
    """
    if validate:
        _check_pre(pre, "threshold_select")
        _check_threshold(threshold, pre.shape[-1], "threshold_select")
    return torch.where(pre > threshold, pre.relu(), 0.0)


def jumprelu(pre: Tensor, threshold: float | Tensor, validate: bool = True) -> Tensor:
    """JumpReLU: keep pre where pre > threshold (scalar or [n_latents]), values relu(pre).

    No gradient reaches the threshold here; training it needs a straight-through estimator.
    """
    if validate:
        _check_pre(pre, "jumprelu")
        _check_threshold(threshold, pre.shape[-1], "jumprelu")
    return torch.where(pre > threshold, pre.relu(), 0.0)


def relu(pre: Tensor, validate: bool = True) -> Tensor:
    """Plain ReLU: every positive entry is kept (the L1-penalised SAE)."""
    if validate:
        _check_pre(pre, "relu")
    return pre.relu()


RULES: dict[str, Callable[..., Tensor]] = {
    "topk": topk,
    "mutual_choice": mutual_choice,
    "feature_choice": feature_choice,
    "gradient_topk": gradient_topk,
    "jumprelu": jumprelu,
    "relu": relu,
}


def get_rule(name: str) -> Callable[..., Tensor]:
    """The selection function stored under `name` (so an SAE can save its rule as a string)."""
    if name not in RULES:
        raise ValueError(f"unknown sparsity rule {name!r}; valid names: {', '.join(sorted(RULES))}")
    return RULES[name]


def select(rule: str, pre: Tensor, **kwargs) -> Tensor:
    """Apply the rule named `rule`, e.g. `select("topk", pre, k=32)`.  pre: [n_tokens, n_latents]."""
    return get_rule(rule)(pre, **kwargs)


# ----------------------------------------------------------------------------- inference threshold


class ThresholdEMA(nn.Module):
    """Inference threshold for the batch-dependent rules.

    Mutual and Feature Choice depend on the batch; at inference on single tokens we use a
    threshold learned during training: an EMA of the smallest selected activation in each training
    batch (as BatchTopK does) -- our reading, the paper does not pin it.

    per_latent=False: one scalar threshold (Mutual Choice / BatchTopK).
    per_latent=True: one threshold per latent, the EMA of that latent's smallest selected value;
    only latents that fired in the batch update (the natural choice for Feature Choice). A latent
    that has never fired keeps threshold inf, so it stays silent at inference.
    The first update of a threshold sets it to the batch value (no bias towards the init).
    Buffers (`threshold`, `seen`) go into the SAE's state_dict; updates never sync with the host.
    """

    threshold: Tensor
    seen: Tensor

    def __init__(self, n_latents: int | None = None, decay: float = 0.99, per_latent: bool = False):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ThresholdEMA: decay must be in [0, 1), got decay={decay}")
        if per_latent and (n_latents is None or n_latents < 1):
            raise ValueError(f"ThresholdEMA: per_latent=True needs n_latents >= 1, got n_latents={n_latents}")
        self.decay, self.per_latent, self.n_latents = decay, per_latent, n_latents
        shape = (n_latents,) if per_latent else ()
        self.register_buffer("threshold", torch.full(shape, math.inf))
        self.register_buffer("seen", torch.zeros(shape, dtype=torch.bool))

    @torch.no_grad()
    def update(self, codes: Tensor) -> Tensor:
        """Fold in one training batch.  codes: [n_tokens, n_latents] from the training rule."""
        if codes.ndim != 2 or (self.per_latent and codes.shape[1] != self.n_latents):
            raise ValueError(f"ThresholdEMA.update: codes must be [n_tokens, n_latents={self.n_latents}], "
                             f"got shape {tuple(codes.shape)}")
        masked = torch.where(codes > 0, codes.detach(), math.inf).to(self.threshold.dtype)
        batch_min = masked.amin(0) if self.per_latent else masked.amin()
        fired = torch.isfinite(batch_min)
        ema = self.decay * self.threshold + (1 - self.decay) * batch_min
        new = torch.where(self.seen, ema, batch_min)
        self.threshold.copy_(torch.where(fired, new, self.threshold))
        self.seen |= fired
        return self.threshold

    def forward(self, pre: Tensor, validate: bool = True) -> Tensor:
        """Inference codes: `threshold_select(pre, threshold)`.  pre: [n_tokens, n_latents]."""
        return threshold_select(pre, self.threshold, validate=validate)
