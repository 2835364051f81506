"""Held-out contexts as shaded text: which tokens carry an SAE's error, get its latents, move its
gradient (the data behind `views.token_view`, for any chapter's store).

- `shown_tokens`: the rows of a test store's first `n_contexts` contexts, in reading order.
- `error_norms`: per shown token, the norms of SaeError, LinearError and NonlinearError of one
  SAE's reconstruction, with W* fitted on the store's other contexts (so the shown tokens are
  held out from the fit, as in the downstream splices: `decomposition.rows_outside_contexts`).
- `token_view`: the view's HTML and its data (one row per shown token, one column per quantity).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from sae_repro import views
from sae_repro.decomposition import decompose, linear_error_fit, rows_outside_contexts


@dataclass(frozen=True)
class Shown:
    """The tokens a view shows: rows [m] of the test store, their context [m] and position [m],
    context by context in reading order; the fit of any LinearError map excludes them."""
    rows: Tensor
    context: Tensor
    position: Tensor
    n_contexts: int

    def fit_rows(self, context: Tensor) -> Tensor:
        """The store rows outside the shown contexts, where a W* is fitted."""
        return rows_outside_contexts(context, self.n_contexts)


def shown_tokens(context: Tensor, position: Tensor, n_contexts: int) -> Shown:
    """The store's contexts 0 .. n_contexts - 1. context, position: [n] the store's tensors."""
    if context.ndim != 1 or position.shape != context.shape:
        raise ValueError(f"context and position must be 1-D tensors of one shape, got {tuple(context.shape)} "
                         f"and {tuple(position.shape)}")
    n_stored = int(context.max()) + 1 if len(context) else 0
    if not 1 <= n_contexts < n_stored:  # at least one context must remain to fit W* on
        raise ValueError(f"n_contexts must be between 1 and {n_stored - 1} (the store holds {n_stored} "
                         f"contexts and W* needs some left over), got {n_contexts}")
    rows = (context < n_contexts).nonzero().flatten()
    rows = rows[torch.argsort(context[rows].long() * (int(position.max()) + 1) + position[rows].long())]
    return Shown(rows, context[rows], position[rows], n_contexts)


def error_norms(x: Tensor, x_hat: Tensor, shown: Shown, context: Tensor) -> dict[str, Tensor]:
    """||SaeError||, ||LinearError||, ||NonlinearError|| [m] of the shown tokens, for x_hat =
    Sae(x) over the whole store x [n, d] (context [n]: the store's), W* fitted outside them."""
    if x.shape != x_hat.shape:
        raise ValueError(f"x_hat must have x's shape {tuple(x.shape)}, got {tuple(x_hat.shape)}")
    fit = linear_error_fit(x, x - x_hat, train_idx=shown.fit_rows(context))
    parts = decompose(x[shown.rows], x_hat[shown.rows], fit)
    return {"SaeError": parts.sae_error.norm(dim=1), "LinearError": parts.linear.norm(dim=1),
            "NonlinearError": parts.nonlinear.norm(dim=1)}


def token_view(shown: Shown, tokens: Tensor, decode: Callable[[int], str], quantities: dict[str, Tensor], *,
               view_id: str, title: str = "") -> tuple[str, pd.DataFrame]:
    """The view (`views.token_view`: the first quantity shaded first, values on hover) of the
    shown tokens -> (HTML fragment, data: context, position, token and one column per quantity).
    tokens: [n] the store's token ids; quantities: label -> [m] values per shown token."""
    m = len(shown.rows)
    if clash := {"context", "position", "token"} & set(quantities):
        raise ValueError(f"quantity labels {sorted(clash)} are the data's own columns: name them otherwise")
    for name, q in quantities.items():
        if q.shape != (m,):
            raise ValueError(f"quantity {name!r} must have one value per shown token ({m}), got {tuple(q.shape)}")
    words = [decode(int(t)) for t in tokens[shown.rows].tolist()]
    ctx = shown.context.tolist()
    texts = [[w for w, c in zip(words, ctx) if c == i] for i in range(shown.n_contexts)]
    values = {name: [q[shown.context == i].tolist() for i in range(shown.n_contexts)]
              for name, q in quantities.items()}
    data = pd.DataFrame({"context": ctx, "position": shown.position.tolist(), "token": words}
                        | {name: q.tolist() for name, q in quantities.items()})
    return views.token_view(texts, values, view_id=view_id, title=title), data
