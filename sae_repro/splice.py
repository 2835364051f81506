"""Splice a replacement (an SAE's reconstruction, or any function of the activation) into the
model's forward pass and measure the downstream damage: next-token loss, KL, CE loss recovered.

    df = spliced_losses(model, hook, store.contexts()[:32], {"TopK": sae_replacement(sae)},
                        drop_first=store.spec.drop_first)

Which positions: those an activation store keeps, `drop_first .. ctx_len - 2` (the first
positions are attention sinks no SAE is trained on; the last has no next token). Only they are
replaced, and only their next-token losses and KLs are averaged. A replacement is called as
`f(x, rows)` with x [n, d] the live activations at those positions and rows [n] their indices in
the store's token order (context c, position p -> c * kept + p - drop_first, where contexts are
the store's `contexts()`), so a replacement can read per-token data from the store, e.g. the
gradients a g-SAE selects with.

Cost: the model runs once up to the hooked layer per batch of contexts; the clean pass and each
replacement then run from that layer on (`start_at_layer`), not from the embedding.
"""

from __future__ import annotations

from typing import Callable, Mapping

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from sae_repro.metrics import ce_loss_recovered, kl_divergence
from sae_repro.models import parse_hook
from sae_repro.sae import SparseAutoencoder

Replacement = Callable[[Tensor, Tensor], Tensor]  # (x [n, d], rows [n]) -> x' [n, d]
ZERO = "zero ablation"


def sae_replacement(sae: SparseAutoencoder, grads: Tensor | None = None) -> Replacement:
    """x -> Sae(x) in eval mode (batch rules use their learned threshold). grads [n_store, d]:
    the store's loss gradients, for a g-SAE to select with (without them it selects like TopK)."""
    sae.eval()

    def replace(x: Tensor, rows: Tensor) -> Tensor:
        g = grads[rows].to(x.device, torch.float32) if grads is not None else None
        return sae(x.float(), g)[0].to(x.dtype)

    return replace


def _check(model: HookedTransformer, hook: str, contexts: Tensor, drop_first: int,
           replacements: Mapping[str, Replacement]) -> int:
    layer = parse_hook(model, hook)
    if contexts.ndim != 2 or contexts.is_floating_point():
        raise ValueError(f"contexts must be token ids [n_contexts, ctx_len], got {contexts.dtype} "
                         f"{tuple(contexts.shape)}")
    if not 0 <= drop_first <= contexts.shape[1] - 2:
        raise ValueError(f"drop_first={drop_first}: expected 0..ctx_len-2={contexts.shape[1] - 2}")
    if ZERO in replacements:
        raise ValueError(f"replacement name {ZERO!r} is reserved for the zero-ablation baseline")
    return layer


@torch.no_grad()
def spliced_losses(model: HookedTransformer, hook: str, contexts: Tensor,
                   replacements: Mapping[str, Replacement], *, drop_first: int,
                   batch_contexts: int = 8, bf16: bool = False, first_context: int = 0,
                   progress: bool = True) -> pd.DataFrame:
    """Mean next-token loss and KL(clean || spliced) with each replacement spliced in at `hook`.

    contexts: [n_contexts, ctx_len] token ids: a store's `contexts()` from `first_context` on (the
    store rows a replacement reads start there). Returns one row per
    replacement plus "clean" and "zero ablation": name, ce (nats/token), ce_increase (over clean),
    kl (nats/token), ce_recovered = (ce_zero - ce) / (ce_zero - ce_clean), n_tokens.
    """
    layer = _check(model, hook, contexts, drop_first, replacements)
    n_ctx, T = contexts.shape
    kept = T - 1 - drop_first
    keep = slice(drop_first, T - 1)
    runs: dict[str, Replacement | None] = {"clean": None, ZERO: lambda x, rows: torch.zeros_like(x)}
    runs |= dict(replacements)
    ce_sum = {name: 0.0 for name in runs}
    kl_sum = {name: 0.0 for name in runs}
    device = model.cfg.device
    for c0 in tqdm(range(0, n_ctx, batch_contexts), desc=f"splice {hook}", disable=not progress):
        ctx = contexts[c0:c0 + batch_contexts].to(device)
        b = len(ctx)
        first = first_context + c0
        rows = (torch.arange(first, first + b)[:, None] * kept + torch.arange(kept)[None]).flatten()
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=bf16):
            resid = model(ctx, stop_at_layer=layer)  # [b, T, d]: input of the hooked block
        clean_logp = None
        for name, fn in runs.items():
            hooks = [] if fn is None else [(hook, _replace_hook(fn, keep, rows))]
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model.run_with_hooks(resid, start_at_layer=layer, fwd_hooks=hooks)
            logp = logits[:, keep].float().log_softmax(-1)  # [b, kept, V]
            target = ctx[:, drop_first + 1:]
            ce_sum[name] += float(-logp.gather(-1, target[..., None]).sum())
            if clean_logp is None:
                clean_logp = logp
            kl_sum[name] += float(kl_divergence(clean_logp, logp).sum())
    n = n_ctx * kept
    ce = {k: v / n for k, v in ce_sum.items()}
    return pd.DataFrame([{"name": k, "ce": ce[k], "ce_increase": ce[k] - ce["clean"],
                          "kl": kl_sum[k] / n,
                          "ce_recovered": ce_loss_recovered(ce["clean"], ce[k], ce[ZERO]),
                          "n_tokens": n} for k in runs])


def _replace_hook(fn: Replacement, keep: slice, rows: Tensor) -> Callable:
    def hook_fn(act: Tensor, hook) -> Tensor:
        b, _, d = act.shape
        x = act[:, keep].reshape(-1, d)
        new = fn(x, rows)
        if new.shape != x.shape or not torch.isfinite(new).all():
            raise ValueError(f"replacement at {hook.name} returned {tuple(new.shape)} (finite: "
                             f"{bool(torch.isfinite(new).all())}), expected finite {tuple(x.shape)}")
        act = act.clone()
        act[:, keep] = new.view(b, -1, d).to(act.dtype)
        return act

    return hook_fn

