"""Splice a replacement (an SAE's reconstruction, or any function of the activation) into the
model's forward pass and measure the downstream damage: next-token loss, KL, CE loss recovered.

    df = spliced_losses(model, hook, store.contexts()[:32], {"TopK": sae_replacement(sae)},
                        drop_first=store.spec.drop_first)
    per = context_losses(...)            # the same, kept per context: for bootstrap intervals

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

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
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


@dataclass(frozen=True)
class ContextLosses:
    """Summed next-token loss and KL(clean || spliced) of each run, per context.

    names: the runs ("clean", "zero ablation", then the replacements); ce, kl: [n_runs,
    n_contexts] float64 sums over each context's `tokens_per_context` scored positions (nats).
    Sums, not means, so a bootstrap over contexts resamples them and divides once."""

    names: tuple[str, ...]
    ce: np.ndarray
    kl: np.ndarray
    tokens_per_context: int

    def of(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(ce [n_contexts], kl [n_contexts]) sums of run `name`."""
        if name not in self.names:
            raise KeyError(f"no spliced run {name!r}; runs: {list(self.names)}")
        i = self.names.index(name)
        return self.ce[i], self.kl[i]

    def summary(self) -> pd.DataFrame:
        """One row per run: name, ce (nats/token), ce_increase (over clean), kl (nats/token),
        ce_recovered = (ce_zero - ce) / (ce_zero - ce_clean), n_tokens."""
        n = self.ce.shape[1] * self.tokens_per_context
        ce = dict(zip(self.names, self.ce.sum(1) / n))
        kl = dict(zip(self.names, self.kl.sum(1) / n))
        return pd.DataFrame([{"name": k, "ce": ce[k], "ce_increase": ce[k] - ce["clean"], "kl": kl[k],
                              "ce_recovered": ce_loss_recovered(ce["clean"], ce[k], ce[ZERO]),
                              "n_tokens": n} for k in self.names])


def spliced_losses(model: HookedTransformer, hook: str, contexts: Tensor,
                   replacements: Mapping[str, Replacement], **kwargs) -> pd.DataFrame:
    """Mean next-token loss and KL(clean || spliced) with each replacement spliced in at `hook`:
    `context_losses(...).summary()` (same arguments), one row per replacement plus "clean" and
    "zero ablation"."""
    return context_losses(model, hook, contexts, replacements, **kwargs).summary()


@torch.no_grad()
def context_losses(model: HookedTransformer, hook: str, contexts: Tensor,
                   replacements: Mapping[str, Replacement], *, drop_first: int,
                   batch_contexts: int = 8, bf16: bool = False, first_context: int = 0,
                   progress: bool = True) -> ContextLosses:
    """Each context's summed next-token loss and KL with each replacement spliced in at `hook`.

    contexts: [n_contexts, ctx_len] token ids: a store's `contexts()` from `first_context` on (the
    store rows a replacement reads start there)."""
    layer = _check(model, hook, contexts, drop_first, replacements)
    n_ctx, T = contexts.shape
    kept = T - 1 - drop_first
    keep = slice(drop_first, T - 1)
    runs: dict[str, Replacement | None] = {"clean": None, ZERO: lambda x, rows: torch.zeros_like(x)}
    runs |= dict(replacements)
    ce_sum = np.zeros((len(runs), n_ctx))
    kl_sum = np.zeros((len(runs), n_ctx))
    device = model.cfg.device
    for c0 in tqdm(range(0, n_ctx, batch_contexts), desc=f"splice {hook}", disable=not progress):
        ctx = contexts[c0:c0 + batch_contexts].to(device)
        b = len(ctx)
        first = first_context + c0
        rows = (torch.arange(first, first + b)[:, None] * kept + torch.arange(kept)[None]).flatten()
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=bf16):
            resid = model(ctx, stop_at_layer=layer)  # [b, T, d]: input of the hooked block
        clean_logp = None
        for i, fn in enumerate(runs.values()):
            hooks = [] if fn is None else [(hook, _replace_hook(fn, keep, rows))]
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model.run_with_hooks(resid, start_at_layer=layer, fwd_hooks=hooks)
            logp = logits[:, keep].float().log_softmax(-1)  # [b, kept, V]
            target = ctx[:, drop_first + 1:]
            ce_sum[i, c0:c0 + b] = (-logp.gather(-1, target[..., None])).double().sum((1, 2)).cpu().numpy()
            if clean_logp is None:
                clean_logp = logp
            kl_sum[i, c0:c0 + b] = kl_divergence(clean_logp, logp).double().sum(1).cpu().numpy()
    return ContextLosses(tuple(runs), ce_sum, kl_sum, kept)


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

