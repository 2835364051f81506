"""Steering: add a direction to a hooked activation and measure how the next-token predictions move.

The g-SAE paper (Olmo et al. 2024) claims its latents "steer the model more effectively in
arbitrary contexts" than TopK latents. We measure steering on a fixed set of contexts that has
nothing to do with the latents (the "arbitrary contexts"): for each direction u (normalised to
unit norm) we add `scale * u` to the activation at `hook`, at every position or only the last,
and compare the steered next-token distribution q with the clean one p:

- `kl`: KL(p || q) in nats, averaged over contexts and over the *steered* positions (all of them
  for positions="all", the last one for positions="last": earlier positions cannot see a change
  at the last one, so their KL is 0 up to float rounding and would only dilute the mean).
- `kl_per_norm`: kl / scale, the KL per unit of added norm. (KL grows like scale^2 for small
  scales; divide by `scale` again for a scale-free small-scale number.)
- `target_logprob_delta`: log q(target) - log p(target), averaged the same way, when a target
  token per direction is given (e.g. `top_promoted_token`, the token the direction most
  promotes through the unembedding).

`scale` is an absolute norm: choose it relative to the typical activation norm at the hook
(residual norms grow with depth, and the first position of a context is often an attention sink
with a far larger norm, where a fixed addition does little).

Every direction is run in the same batches of contexts, with several directions stacked into
the batch dimension; the blocks before the hooked one and the clean logits run once per batch of
contexts, each steered pass from the hooked block on (`start_at_layer`).

`paired_steering` is the comparison the g-SAE chapter makes: every direction of each group (e.g.
TopK and g-SAE latents) steered over a sweep of scales beside a random direction of the same
norm, the i-th direction of every group paired with random direction i, so that each latent is
scored against the baseline "any direction of that norm" on the same contexts
(`log_kl_ratio`, `target_gain`), and `per_direction` averages those scores over the scales.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from sae_repro.models import parse_hook

POSITIONS = ("all", "last")
METRICS = ("kl", "kl_per_norm", "target_logprob_delta")


def random_directions(n: int, d: int, seed: int = 0) -> Tensor:
    """n isotropic random unit vectors, the baseline for latent directions.  -> [n, d] float32."""
    if n < 1 or d < 1:
        raise ValueError(f"random_directions: n={n}, d={d}; both must be >= 1")
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, d, generator=g, dtype=torch.float64)
    return (v / v.norm(dim=-1, keepdim=True)).float()


def _unit_directions(model: HookedTransformer, directions: Tensor) -> Tensor:
    """[n_dirs, d_model] or [d_model] -> unit rows [n_dirs, d_model], float32 on the model's device."""
    d_model = model.cfg.d_model
    if directions.ndim == 1:
        directions = directions[None]
    if directions.ndim != 2 or directions.shape[1] != d_model or directions.shape[0] == 0:
        raise ValueError(f"directions: shape {tuple(directions.shape)}, expected [n_dirs, d_model={d_model}]")
    if not directions.is_floating_point() or not torch.isfinite(directions).all():
        raise ValueError("directions: must be a finite floating-point tensor")
    norm = directions.double().norm(dim=-1, keepdim=True)
    if (norm == 0).any():
        raise ValueError(f"directions: rows {torch.nonzero(norm[:, 0] == 0)[:, 0].tolist()} have zero norm")
    return (directions.double() / norm).float().to(model.cfg.device)


def _check_tokens(model: HookedTransformer, tokens: Tensor) -> Tensor:
    if tokens.ndim != 2 or tokens.dtype not in (torch.int32, torch.int64) or tokens.numel() == 0:
        raise ValueError(f"tokens: {tokens.dtype} of shape {tuple(tokens.shape)}, expected a "
                         f"non-empty integer tensor [n_ctx, ctx_len]")
    if tokens.shape[1] > model.cfg.n_ctx:
        raise ValueError(f"tokens: ctx_len={tokens.shape[1]} exceeds the model's n_ctx={model.cfg.n_ctx}")
    if tokens.min() < 0 or tokens.max() >= model.cfg.d_vocab:
        raise ValueError(f"tokens: ids must lie in 0..{model.cfg.d_vocab - 1}, got "
                         f"{int(tokens.min())}..{int(tokens.max())}")
    return tokens.long().to(model.cfg.device)


@torch.no_grad()
def direct_logits(model: HookedTransformer, directions: Tensor) -> Tensor:
    """The logit change each unit direction makes through the unembedding alone (direct path).
    [n_dirs, d_model] -> [n_dirs, d_vocab].

    (LN-centred u * ln_final.w) @ W_U: blocks between the hook and the unembedding are ignored
    (exact only at the last layer's resid_post), and so is ln_final's per-token normalisation: it
    is a positive scale that leaves the order of u's own contribution alone, but it also mixes u
    with the residual already present.
    """
    u = _unit_directions(model, directions)
    if model.cfg.normalization_type in ("LN", "LNPre"):
        u = u - u.mean(-1, keepdim=True)  # LayerNorm removes the mean across d_model
    w = getattr(getattr(model, "ln_final", None), "w", None)
    if w is not None:
        u = u * w.float()
    return u @ model.W_U.float()


def top_promoted_token(model: HookedTransformer, directions: Tensor) -> Tensor:
    """The token each direction most promotes through the unembedding (`direct_logits`, an
    approximation).  [n_dirs, d_model] -> [n_dirs]."""
    return direct_logits(model, directions).argmax(-1)


def _add_hook(directions: Tensor, scale: float, positions: str, n_ctx: int) -> Callable:
    """Hook adding scale * directions[j] to batch rows j*n_ctx .. (j+1)*n_ctx - 1.  act: [k*n_ctx, L, d]."""
    add = (scale * directions).repeat_interleave(n_ctx, dim=0)  # [k*n_ctx, d]

    def hook_fn(act: Tensor, hook) -> Tensor:
        a = add.to(act.dtype)
        if positions == "all":
            return act + a[:, None, :]
        act = act.clone()
        act[:, -1] += a
        return act

    return hook_fn


@dataclass
class SteeringPerPosition:
    """Per-position effects of steering; positions="last" leaves earlier positions at 0 (causal masking)."""

    kl: Tensor  # [n_dirs, n_ctx, ctx_len] float64, KL(clean || steered) in nats
    target_logprob_delta: Tensor | None  # [n_dirs, n_ctx, ctx_len] float64, None without targets


def _check_args(model, hook, scale, positions, batch_size) -> None:
    parse_hook(model, hook)
    if positions not in POSITIONS:
        raise ValueError(f"positions={positions!r}: expected one of {POSITIONS}")
    if not math.isfinite(scale):
        raise ValueError(f"scale={scale}: must be finite")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")


@torch.no_grad()
def steering_per_position(
    model: HookedTransformer,
    hook: str,
    directions: Tensor,
    tokens: Tensor,
    *,
    scale: float,
    positions: Literal["all", "last"] = "all",
    targets: Tensor | None = None,
    batch_size: int = 8,
) -> SteeringPerPosition:
    """KL and target log-prob change at every position for each direction.

    hook: a full hook name accepted by `models.parse_hook` ('blocks.3.hook_resid_post', ...).
    directions: [n_dirs, d_model] (normalised here), tokens: [n_ctx, ctx_len], targets: [n_dirs].
    batch_size: sequences per forward pass (contexts x stacked directions); the float64 log-probs
    of one pass take batch_size * ctx_len * d_vocab * 8 bytes, twice.
    """
    _check_args(model, hook, scale, positions, batch_size)
    dirs, tokens = _unit_directions(model, directions), _check_tokens(model, tokens)
    n_dirs, (n_ctx, ctx_len) = dirs.shape[0], tokens.shape
    if targets is not None:
        targets = torch.as_tensor(targets)
        if targets.shape != (n_dirs,) or targets.is_floating_point():
            raise ValueError(f"targets: {targets.dtype} of shape {tuple(targets.shape)}, expected "
                             f"integer token ids [n_dirs={n_dirs}]")
        if targets.min() < 0 or targets.max() >= model.cfg.d_vocab:
            raise ValueError(f"targets: ids must lie in 0..{model.cfg.d_vocab - 1}")
        targets = targets.long().to(model.cfg.device)
    kl = torch.zeros(n_dirs, n_ctx, ctx_len, dtype=torch.float64)
    delta = torch.zeros_like(kl) if targets is not None else None
    layer = parse_hook(model, hook)
    ctx_per_pass = min(batch_size, n_ctx)
    dirs_per_pass = max(1, batch_size // ctx_per_pass)
    for c0 in range(0, n_ctx, ctx_per_pass):
        ctx = tokens[c0:c0 + ctx_per_pass]
        nb = ctx.shape[0]
        # the blocks before the hooked one run once per batch of contexts; every pass starts there
        resid = model(ctx, stop_at_layer=layer)  # [nb, L, d]: input of block `layer`
        # float64 log-probs so that tiny KLs (small scales) are not lost to float32 rounding.
        clean = model(resid, start_at_layer=layer).double().log_softmax(-1)  # [nb, L, V]
        p_clean = clean.exp()
        for d0 in range(0, n_dirs, dirs_per_pass):
            chunk = dirs[d0:d0 + dirs_per_pass]
            k = chunk.shape[0]
            logits = model.run_with_hooks(resid.repeat(k, 1, 1), start_at_layer=layer,
                                          fwd_hooks=[(hook, _add_hook(chunk, scale, positions, nb))])
            steered = logits.double().log_softmax(-1).view(k, nb, ctx_len, -1)  # [k, nb, L, V]
            kl[d0:d0 + k, c0:c0 + nb] = (p_clean * (clean - steered)).sum(-1).cpu()
            if delta is not None:
                t = targets[d0:d0 + k].view(k, 1, 1, 1).expand(k, nb, ctx_len, 1)
                d = steered.gather(-1, t) - clean[None].expand(k, -1, -1, -1).gather(-1, t)
                delta[d0:d0 + k, c0:c0 + nb] = d[..., 0].cpu()
    return SteeringPerPosition(kl=kl, target_logprob_delta=delta)


def steering_effect(
    model: HookedTransformer,
    hook: str,
    directions: Tensor,
    tokens: Tensor,
    *,
    scale: float,
    positions: Literal["all", "last"] = "all",
    targets: Tensor | None = None,
    batch_size: int = 8,
) -> pd.DataFrame:
    """One row per direction: direction, scale, positions, kl, kl_per_norm, target, target_logprob_delta.

    Means are over contexts and the steered positions (see the module docstring). kl_per_norm is
    kl / scale (NaN at scale 0); target columns are NA/NaN without targets.
    """
    res = steering_per_position(model, hook, directions, tokens, scale=scale, positions=positions,
                                targets=targets, batch_size=batch_size)
    sl = slice(None) if positions == "all" else slice(-1, None)  # steered positions only
    kl = res.kl[..., sl].mean((1, 2))
    n_dirs = kl.shape[0]
    delta = (res.target_logprob_delta[..., sl].mean((1, 2)).tolist() if targets is not None
             else [float("nan")] * n_dirs)
    return pd.DataFrame({
        "direction": range(n_dirs),
        "scale": float(scale),
        "positions": positions,
        "kl": kl.tolist(),
        "kl_per_norm": (kl / scale).tolist() if scale != 0 else [float("nan")] * n_dirs,
        "target": pd.array(torch.as_tensor(targets).tolist() if targets is not None else [None] * n_dirs,
                           dtype="Int64"),
        "target_logprob_delta": delta,
    })


def compare_steering(
    model: HookedTransformer,
    hook: str,
    dirs_a: Tensor,
    dirs_b: Tensor,
    tokens: Tensor,
    scale: float,
    *,
    names: tuple[str, str] = ("a", "b"),
    positions: Literal["all", "last"] = "all",
    targets: Literal["top"] | None = "top",
    batch_size: int = 8,
) -> pd.DataFrame:
    """Summary of `steering_effect` for two groups of directions (e.g. g-SAE vs TopK latents).

    dirs_a: [n_a, d_model], dirs_b: [n_b, d_model]. targets="top" uses each direction's
    `top_promoted_token`; None skips the target metric. One row per (group, metric) with
    n, mean, median and sem (standard error of the mean over directions).
    """
    if targets not in ("top", None):
        raise ValueError(f"targets={targets!r}: expected 'top' or None")
    if len(names) != 2 or names[0] == names[1]:
        raise ValueError(f"names={names!r}: expected two distinct group names")
    rows = []
    for name, dirs in zip(names, (dirs_a, dirs_b)):
        tgt = top_promoted_token(model, dirs) if targets == "top" else None
        df = steering_effect(model, hook, dirs, tokens, scale=scale, positions=positions,
                             targets=tgt, batch_size=batch_size)
        for metric in (METRICS if targets else METRICS[:2]):
            v = df[metric]
            rows.append({"group": name, "metric": metric, "n": len(v), "mean": v.mean(),
                         "median": v.median(), "sem": v.sem()})
    return pd.DataFrame(rows)


def live_latents(density: Tensor, n: int, seed: int = 0) -> Tensor:
    """n distinct latents drawn uniformly (seeded) among those that fire (density > 0), sorted.

    density: [n_latents] firing frequencies (e.g. `train.evaluate(...)["density"]`) -> LongTensor [n].
    Dead latents have no meaning to steer with, so a steering comparison draws from the live ones.
    """
    if not isinstance(density, Tensor) or density.ndim != 1 or not torch.isfinite(density.double()).all():
        raise ValueError(f"live_latents: density must be a finite 1-D tensor [n_latents], got "
                         f"{getattr(density, 'shape', type(density).__name__)}")
    live = torch.nonzero(density > 0)[:, 0].cpu()
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(live):
        raise ValueError(f"live_latents: n={n!r} must be an int in 1..{len(live)} (the number of "
                         f"live latents of {len(density)})")
    pick = torch.randperm(len(live), generator=torch.Generator().manual_seed(seed))[:n]
    return live[pick].sort().values


PAIRED = ("log_kl_ratio", "target_gain")  # paired_steering's scores of a direction against its random pair


def paired_steering(
    model: HookedTransformer,
    hook: str,
    directions: Mapping[str, Tensor],
    tokens: Tensor,
    *,
    scales: Sequence[float],
    seed: int = 0,
    positions: Literal["all", "last"] = "all",
    batch_size: int = 8,
) -> pd.DataFrame:
    """Each group's directions and their paired random directions, steered at every scale.

    directions: group name -> [n_g, d_model] (normalised here; "random" is not a group name).
    The i-th direction of every group is paired with random direction i (`random_directions(max
    n_g, d_model, seed)`: one baseline shared by the groups, so their scores differ by the
    directions alone). Each direction's target is its own `top_promoted_token`, the random
    direction's too. scales: absolute added norms, each > 0.

    One row per (group, direction, scale), groups in the order given and then "random" (its own
    rows, `pair` = its index): kl, target_logprob_delta (means over contexts and steered
    positions, `steering_effect`), random_kl and random_target_logprob_delta of its pair, and
    log_kl_ratio = ln(kl / random_kl), target_gain = target_logprob_delta - that of the pair.
    """
    if not directions or "random" in directions:
        raise ValueError(f"directions: expected named groups other than 'random', got {list(directions)}")
    scales = [float(x) for x in scales]
    if not scales or not all(math.isfinite(x) and x > 0 for x in scales):
        raise ValueError(f"scales={scales}: expected a non-empty list of finite norms > 0")
    n = max(len(_unit_directions(model, d)) for d in directions.values())
    groups = dict(directions) | {"random": random_directions(n, model.cfg.d_model, seed=seed)}
    frames = []
    for scale in scales:
        effects = {}
        for name, dirs in groups.items():
            df = steering_effect(model, hook, dirs, tokens, scale=scale, positions=positions,
                                 targets=top_promoted_token(model, dirs), batch_size=batch_size)
            effects[name] = df.assign(group=name, pair=df["direction"])
        rand = effects["random"].set_index("pair")
        for name, df in effects.items():
            pair_kl = rand.loc[df["pair"], "kl"].to_numpy()
            pair_delta = rand.loc[df["pair"], "target_logprob_delta"].to_numpy()
            frames.append(df.assign(random_kl=pair_kl, random_target_logprob_delta=pair_delta,
                                    log_kl_ratio=np.log(df["kl"].to_numpy() / pair_kl),
                                    target_gain=df["target_logprob_delta"].to_numpy() - pair_delta))
    order = {g: i for i, g in enumerate(groups)}
    out = pd.concat(frames, ignore_index=True)
    out = out.sort_values(["group", "direction", "scale"], key=lambda c: c.map(order) if c.name == "group" else c,
                          kind="stable", ignore_index=True)
    return out[["group", "direction", "pair", "scale", "positions", "kl", "kl_per_norm", "target",
                "target_logprob_delta", "random_kl", "random_target_logprob_delta", *PAIRED]]


def per_direction(paired: pd.DataFrame) -> pd.DataFrame:
    """`paired_steering`'s rows averaged over the scales: one row per (group, direction) with the
    mean log_kl_ratio and target_gain (the random group's are 0 by construction)."""
    missing = {"group", "direction", *PAIRED} - set(paired.columns)
    if missing:
        raise ValueError(f"per_direction: expected paired_steering's rows, missing columns {sorted(missing)}")
    return (paired.groupby(["group", "direction"], sort=False)[list(PAIRED)].mean().reset_index())
