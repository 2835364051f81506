"""What each latent of an SAE responds to on held-out tokens, and a measured proxy of how
interpretable the latents are.

- `activity`: per latent, how often it fires and its `n_top` largest activations (value and token
  index), streamed over held-out tokens in eval mode (the batch rules use their learned
  threshold, a g-SAE selects with the tokens' loss gradients, as in `train.evaluate`).
- `card`: one latent's card: density, its top-activating contexts (a window of tokens around each
  activating token, every token's activation of that latent) and the tokens whose logits its
  decoder direction raises and lowers most through the unembedding (`steering.direct_logits`).
- `token_concentration`, `context_spread`: the proxy (our reading; the papers' own measure is an
  LLM's explanation score, which needs a hub model): of a latent's `n_top` largest held-out
  activations, the share on its single most frequent token identity, and the share of distinct
  contexts among them. A latent that reads one word scores 1 on concentration; one spread evenly
  over `n_top` different tokens scores 1 / n_top; `random_concentration` is the score of tokens
  drawn at random. Only latents with at least `n_top` firings are scored (fewer would make the
  shares incomparable).
- `mean_interval`: the mean of a proxy over latents with its 95% bootstrap interval (latents
  resampled); `difference_of_means`: the same for the difference between two SAEs' latents.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from sae_repro.intervals import CONFIDENCE, N_RESAMPLES
from sae_repro.sae import BATCH_RULES, SparseAutoencoder
from sae_repro.train import _eval_batches


@dataclass(frozen=True)
class Activity:
    """Held-out activity of every latent. counts: [n_latents] firings; density: counts / n_tokens;
    top_vals: [n_latents, n_top] largest activations, descending (0 past a latent's firings);
    top_idx: [n_latents, n_top] their token indices into x (-1 past a latent's firings)."""

    n_tokens: int
    counts: Tensor
    top_vals: Tensor
    top_idx: Tensor

    @property
    def density(self) -> Tensor:
        return self.counts.double() / self.n_tokens


@torch.no_grad()
def activity(sae: SparseAutoencoder, x: Tensor, grads: Tensor | None = None, *, n_top: int = 20,
             batch_size: int = 2048) -> Activity:
    """Stream x [n, d_in] (grads: its loss gradients, for a g-SAE) through `sae` -> `Activity`."""
    if isinstance(n_top, bool) or not isinstance(n_top, int) or not 1 <= n_top <= x.shape[0]:
        raise ValueError(f"n_top={n_top!r}: expected an int in 1..{x.shape[0]} (the number of tokens)")
    n_lat = sae.cfg.n_latents
    counts = torch.zeros(n_lat, dtype=torch.long)
    vals = torch.zeros(n_lat, 0)
    idx = torch.zeros(n_lat, 0, dtype=torch.long)
    start = 0
    for xb, out in _eval_batches(sae, x, grads, batch_size):
        dense = out.codes.to_dense().float().cpu().T  # [n_latents, b]
        counts += (dense > 0).sum(1)
        v, i = dense.topk(min(n_top, dense.shape[1]), dim=1)
        vals, pos = torch.cat([vals, v], 1).topk(min(n_top, vals.shape[1] + v.shape[1]), dim=1)
        idx = torch.cat([idx, i + start], 1).gather(1, pos)
        start += len(xb)
    idx = torch.where(vals > 0, idx, torch.full_like(idx, -1))
    return Activity(int(x.shape[0]), counts, vals, idx)


def _token_index(context: Tensor, position: Tensor) -> dict[tuple[int, int], int]:
    return {(int(c), int(p)): t for t, (c, p) in enumerate(zip(context.tolist(), position.tolist()))}


@dataclass
class Card:
    """One latent: `examples` are (tokens [w] as text, activations [w], index of the activating
    token in the window); `raises` / `lowers` are (token text, logit change per unit direction);
    `steering`, where measured (`steering.steering_effect` of its decoder direction): scale,
    kl_per_norm, target (the token it most promotes) and target_logprob_delta."""

    sae: str
    latent: int
    density: float
    firings: int
    examples: list[tuple[list[str], list[float], int]] = field(default_factory=list)
    raises: list[tuple[str, float]] = field(default_factory=list)
    lowers: list[tuple[str, float]] = field(default_factory=list)
    steering: dict[str, float | str] | None = None


def card(name: str, latent: int, act: Activity, acts: dict[int, float], tokens: Tensor,
         context: Tensor, position: Tensor, logits: Tensor, decode, *, n_examples: int = 5,
         window: int = 8, n_logits: int = 8) -> Card:
    """The card of `latent` of SAE `name`.

    acts: token index -> the token's activation of `latent`, for the tokens around its top
    activations (`window_activations`; absent means 0); tokens, context, position: [n] the held-out tokens' ids
    and where they sit; logits: [d_vocab] the latent's direct logit effect; decode: token id -> text.
    """
    c = Card(name, int(latent), float(act.density[latent]), int(act.counts[latent]))
    where = _token_index(context, position)
    for t in act.top_idx[latent, :n_examples].tolist():
        if t < 0:
            break
        ctx, pos = int(context[t]), int(position[t])
        span = [where[(ctx, p)] for p in range(pos - window, pos + window + 1) if (ctx, p) in where]
        c.examples.append(([decode(int(tokens[s])) for s in span],
                           [float(acts.get(s, 0.0)) for s in span], span.index(t)))
    up, down = logits.topk(n_logits), (-logits).topk(n_logits)
    c.raises = [(decode(int(i)), float(v)) for v, i in zip(up.values, up.indices)]
    c.lowers = [(decode(int(i)), -float(v)) for v, i in zip(down.values, down.indices)]
    return c


@torch.no_grad()
def window_activations(sae: SparseAutoencoder, x: Tensor, grads: Tensor | None, latents: Tensor,
                       act: Activity, context: Tensor, position: Tensor, *, n_examples: int = 5,
                       window: int = 8) -> dict[int, dict[int, float]]:
    """latent -> {token index: activation} over the windows around each latent's top
    `n_examples` tokens (in eval mode; the windows are encoded together as one batch)."""
    if sae.cfg.rule in BATCH_RULES and sae.cfg.inference != "threshold":
        raise ValueError(f"window_activations: sae.cfg.inference={sae.cfg.inference!r} makes a batch "
                         "rule's codes depend on the batch, so a window would not see the full pass's "
                         "activations; allowed: 'threshold'")
    where = _token_index(context, position)
    need: set[int] = set()
    for lat in latents.tolist():
        for t in act.top_idx[lat, :n_examples].tolist():
            if t >= 0:
                c, p = int(context[t]), int(position[t])
                need.update(where[(c, q)] for q in range(p - window, p + window + 1) if (c, q) in where)
    order = sorted(need)
    sel = torch.tensor(order, dtype=torch.long)
    out: dict[int, dict[int, float]] = {int(lat): {} for lat in latents.tolist()}
    # a batch rule's threshold does not depend on the batch in eval mode, so encoding a subset
    # gives each token the activations it has in the full pass
    lats, start = latents.tolist(), 0
    for _, o in _eval_batches(sae, x[sel], grads[sel] if grads is not None else None, 4096):
        dense = o.codes.to_dense().float().cpu()[:, latents]
        for row, j in torch.nonzero(dense > 0).tolist():  # only the active entries
            out[int(lats[j])][order[start + row]] = float(dense[row, j])
        start += dense.shape[0]
    return out


def token_concentration(act: Activity, tokens: Tensor) -> Tensor:
    """[n_latents] share of each latent's n_top largest activations on its most frequent token
    id (NaN for latents with fewer than n_top firings)."""
    n_top = act.top_idx.shape[1]
    ids = tokens[act.top_idx.clamp(min=0)]  # [n_latents, n_top]
    top_share = torch.tensor([np.bincount(r).max() for r in ids.numpy()], dtype=torch.float64) / n_top
    return torch.where(act.counts >= n_top, top_share, torch.full_like(top_share, float("nan")))


def random_concentration(tokens: Tensor, n_top: int, *, n_draws: int = 2000, seed: int = 0) -> float:
    """The mean token concentration of `n_top` held-out tokens drawn at random (without
    replacement, seeded): what latents firing on tokens regardless of identity would score."""
    if not 2 <= n_top <= len(tokens):
        raise ValueError(f"n_top={n_top!r}: expected 2..{len(tokens)} (the number of tokens)")
    g = torch.Generator().manual_seed(seed)
    shares = [np.bincount(tokens[torch.randperm(len(tokens), generator=g)[:n_top]].numpy()).max()
              for _ in range(n_draws)]
    return float(np.mean(shares)) / n_top


def context_spread(act: Activity, context: Tensor) -> Tensor:
    """[n_latents] share of distinct contexts among each latent's n_top largest activations (NaN
    for latents with fewer than n_top firings)."""
    n_top = act.top_idx.shape[1]
    ctx = context[act.top_idx.clamp(min=0)]
    spread = torch.tensor([len(set(r)) for r in ctx.tolist()], dtype=torch.float64) / n_top
    return torch.where(act.counts >= n_top, spread, torch.full_like(spread, float("nan")))


def _finite(v: Tensor | np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64).reshape(-1)
    a = a[~np.isnan(a)]
    if a.size < 2:
        raise ValueError(f"{name}: needs at least 2 scored latents, got {a.size}")
    return a


def mean_interval(values: Tensor | np.ndarray, *, seed: int = 0, n_resamples: int = N_RESAMPLES,
                  confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean over latents (NaN left out) and its 95% percentile bootstrap."""
    a = _finite(values, "mean_interval")
    res = stats.bootstrap((a,), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                          method="percentile", rng=np.random.default_rng(seed))
    return float(a.mean()), float(res.confidence_interval.low), float(res.confidence_interval.high)


def difference_of_means(a: Tensor | np.ndarray, b: Tensor | np.ndarray, *, seed: int = 0,
                        n_resamples: int = N_RESAMPLES,
                        confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean(a) - mean(b), lo, hi), the latents of each SAE resampled independently."""
    x, y = _finite(a, "difference_of_means (a)"), _finite(b, "difference_of_means (b)")
    res = stats.bootstrap((x, y), lambda u, v, axis=-1: u.mean(axis) - v.mean(axis), n_resamples=n_resamples,
                          confidence_level=confidence, method="percentile",
                          rng=np.random.default_rng(seed))
    return float(x.mean() - y.mean()), float(res.confidence_interval.low), float(res.confidence_interval.high)
