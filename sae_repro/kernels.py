"""Sparse autograd kernels: codes as (token, latent) pairs, and products that touch only them.

The layout is `F.embedding_bag`'s (`SparseCodes`): pairs sorted by token, with the token of each
pair (`bag`) and where each token's pairs start (`offsets`). The encoder matmul is the only dense
product of a training step; the decoder (`sparse_decode`) and every backward (`GatherPre`,
`segment_sum`) touch only the active pairs, as sparsify's `fused_encoder.py` does. `select_pairs`
turns pre-activations into a rule's pairs without a dense codes tensor. One TopK train step at
d_in=576, n_latents=4608, k=32, batch 4096 on one core of an AMX machine: sparse 0.29 s with the
encoder matmul in bf16, 0.46 s in fp32; dense autograd 1.4 s / 1.6 s; SAELens' TopKTrainingSAE
2.0 s. The embedding_bag decoder takes ~20 ms, the matmul ~210 ms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def segment_sum(idx: Tensor, bag: Tensor, weights: Tensor, rows: Tensor, n_out: int) -> Tensor:
    """out[l] = sum over pairs p with idx[p] == l of weights[p] * rows[bag[p]]  -> [n_out, d].

    The backward of both sparse products: group the pairs by latent (a stable sort, so the sum
    order and thus the result is deterministic) and let embedding_bag do the weighted row sums.
    """
    key = idx.int() if idx.numel() < 2**31 else idx  # int32 sorts ~5x faster than int64
    order = key.sort(stable=True).indices
    counts = torch.bincount(idx, minlength=n_out)
    offsets = counts.cumsum(0) - counts
    return F.embedding_bag(bag[order], rows, offsets, mode="sum", per_sample_weights=weights[order])


class _SparseDecode(torch.autograd.Function):
    """out[t] = sum over t's pairs of vals[p] * W_dec[idx[p]]  (no bias).  -> [n_tokens, d_in]."""

    @staticmethod
    def forward(ctx, vals: Tensor, W_dec: Tensor, idx: Tensor, offsets: Tensor, bag: Tensor) -> Tensor:
        ctx.save_for_backward(vals, W_dec, idx, offsets, bag)
        return F.embedding_bag(idx, W_dec, offsets, mode="sum", per_sample_weights=vals)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        vals, W_dec, idx, offsets, bag = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        g_vals = g_W = None
        if ctx.needs_input_grad[0]:  # <grad_out[t], W_dec[l]> per pair, without materialising W_dec[idx]
            g_vals = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad_out, W_dec, idx, offsets, bag, 0, -1)
        if ctx.needs_input_grad[1]:
            g_W = segment_sum(idx, bag, vals, grad_out, W_dec.shape[0])
        return g_vals, g_W, None, None, None


def sparse_decode(vals: Tensor, idx: Tensor, offsets: Tensor, bag: Tensor, W_dec: Tensor) -> Tensor:
    """sum_p vals[p] W_dec[idx[p]] per token (no b_dec), differentiable wrt vals and W_dec.

    vals, idx, bag: [P] pairs sorted by token (bag = token of each pair); offsets: [n_tokens].
    """
    return _SparseDecode.apply(vals.to(W_dec.dtype), W_dec, idx, offsets, bag)


class GatherPre(torch.autograd.Function):
    """relu(pre) at the active pairs, with a backward that touches only those pairs.

    pre = x_c @ W_enc + b_enc (x_c = x - b_dec) was computed without autograd, maybe in bf16;
    this attaches its exact gradient. For pair p = (token t, latent l) with upstream g_p:
    dW_enc[:, l] += g_p x_c[t];  db_enc[l] += g_p;  dx[t] += g_p W_enc[:, l];  db_dec = -sum_t dx[t]
    (= -W_enc @ db_enc, which needs no per-token work when x itself needs no gradient).
    """

    @staticmethod
    def forward(ctx, pre_vals: Tensor, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor,
                x_c: Tensor, idx: Tensor, offsets: Tensor, bag: Tensor, use_b_dec: bool) -> Tensor:
        vals = pre_vals.relu()
        ctx.save_for_backward(vals, x_c, W_enc, idx, offsets, bag)
        ctx.use_b_dec = use_b_dec
        return vals

    @staticmethod
    def backward(ctx, grad_vals: Tensor):
        vals, x_c, W_enc, idx, offsets, bag = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = torch.where(vals > 0, grad_vals, 0.0)  # relu
        g_x = g_W = g_b = g_bd = None
        if need[2]:
            g_W = segment_sum(idx, bag, g, x_c, W_enc.shape[1]).t()
        if need[3] or need[4]:
            g_b = torch.zeros(W_enc.shape[1], dtype=g.dtype, device=g.device).index_add_(0, idx, g)
        if need[1]:
            g_x = F.embedding_bag(idx, W_enc.t().contiguous(), offsets, mode="sum", per_sample_weights=g)
        if need[4] and ctx.use_b_dec:
            g_bd = -(g_x.sum(0) if g_x is not None else W_enc @ g_b)
        return None, g_x, g_W, g_b if need[3] else None, g_bd, None, None, None, None, None


def flat_topk_indices(flat: Tensor, M: int) -> Tensor:
    """Indices of the M largest entries of a 1-D tensor (the set `flat.topk(M)` keeps, up to ties).

    A full topk over n_tokens * n_latents entries is slow on CPU (~0.6 s at 4096 x 4608); a
    strided sample gives a value tau below the M-th largest, so the exact topk only runs on the
    entries >= tau. Falls back to the full topk if the sample guessed wrong.
    """
    N = flat.numel()
    if M * 4 >= N or N < 1 << 18:
        return flat.topk(M, sorted=False).indices
    sample = flat[:: N // 65536]
    rank = max(1, int(sample.numel() * (1.0 - 2.0 * M / N)))  # 2x margin on the expected count
    tau = sample.kthvalue(rank).values
    cand = (flat >= tau).nonzero().squeeze(1)
    if cand.numel() < M:
        return flat.topk(M, sorted=False).indices
    return cand[flat[cand].topk(M, sorted=False).indices]


@dataclass
class SparseCodes:
    """Active (token, latent) pairs sorted by token: the `F.embedding_bag` layout.

    vals [P] relu(pre) (differentiable; a selected pair may read 0), idx [P] its latent,
    bag [P] its token (non-decreasing), offsets [n_tokens] where each token's pairs start.
    """

    vals: Tensor
    idx: Tensor
    bag: Tensor
    offsets: Tensor
    n_latents: int

    @property
    def n_tokens(self) -> int:
        return self.offsets.numel()

    def to_dense(self) -> Tensor:
        """-> [n_tokens, n_latents], differentiable wrt vals."""
        dense = self.vals.new_zeros(self.n_tokens, self.n_latents)
        return dense.index_put((self.bag, self.idx), self.vals)

    def active_per_token(self) -> Tensor:
        """How many latents are active (non-zero) on each token.  -> LongTensor [n_tokens]."""
        return torch.bincount(self.bag[self.vals.detach() != 0], minlength=self.n_tokens)

    def fire_counts(self) -> Tensor:
        """How many tokens each latent is active (> 0) on.  -> LongTensor [n_latents]."""
        return torch.bincount(self.idx[self.vals.detach() > 0], minlength=self.n_latents)

    @classmethod
    def from_dense(cls, codes: Tensor) -> "SparseCodes":
        """codes [n_tokens, n_latents] -> pairs at its non-zero entries (values keep autograd)."""
        n, L = codes.shape
        flat = (codes.detach() != 0).view(-1).nonzero().squeeze(1)
        bag, idx = flat // L, flat % L
        counts = torch.bincount(bag, minlength=n)
        return cls(codes.reshape(-1)[flat], idx, bag, counts.cumsum(0) - counts, L)


def rows_layout(pre: Tensor, cols: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """cols [n, j] latents per token -> (pre values, idx, bag, offsets) of the n*j pairs."""
    n, j = cols.shape
    bag = torch.arange(n, device=pre.device).repeat_interleave(j)
    offsets = torch.arange(0, n * j, j, device=pre.device)
    return pre.gather(1, cols).reshape(-1), cols.reshape(-1), bag, offsets


def flat_layout(pre: Tensor, flat: Tensor, is_sorted: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """flat indices t * L + l into pre [n, L] (any order) -> (pre values, idx, bag, offsets) sorted
    by token. pre may be any layout (Feature Choice passes a transposed view)."""
    n, L = pre.shape
    if not is_sorted:
        flat = (flat.int().sort().values if pre.numel() < 2**31 else flat.sort().values).long()
    bag, idx = flat // L, flat % L
    counts = torch.bincount(bag, minlength=n)
    return pre[bag, idx], idx, bag, counts.cumsum(0) - counts


def select_pairs(pre: Tensor, rule: str, *, k: int = 0, score: Tensor | None = None,
                 threshold: Tensor | float | None = None,
                 capacity: int | Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A rule's active pairs of pre [n, L] -> (pre values, idx, bag, offsets), sorted by token.

    rule "topk": each token's k largest of `score` (default: pre; the g-SAE passes its score);
    "threshold": entries above `threshold` (a float or [L]) and above 0 (JumpReLU, ReLU, batch
    rules at inference); "mutual_choice": the k * n largest of the batch; "feature_choice": each
    latent's top `capacity` tokens (an int, or a LongTensor [L] per latent).
    """
    n, L = pre.shape
    if rule == "topk":
        return rows_layout(pre, (pre if score is None else score).topk(k, dim=-1, sorted=False).indices)
    if rule == "threshold":
        mask = (pre > threshold) & (pre > 0)
        return flat_layout(pre, mask.reshape(-1).nonzero().squeeze(1), is_sorted=True)
    if rule == "mutual_choice":
        return flat_layout(pre, flat_topk_indices(pre.view(-1), k * n))
    if rule != "feature_choice":
        raise ValueError(f"select_pairs: rule={rule!r}; allowed: topk, threshold, mutual_choice, feature_choice")
    m = capacity
    m_max = int(m.max()) if isinstance(m, Tensor) else m
    # topk along rows of pre^T: ~1.6x faster than along dim 0 on CPU (no copy if pre is a
    # transposed view, as SparseAutoencoder computes it for this rule)
    tok = pre.t().contiguous().topk(m_max, dim=1, sorted=isinstance(m, Tensor)).indices.t()  # [m_max, L]
    flat = tok * L + torch.arange(L, device=pre.device)
    if isinstance(m, Tensor):
        m = m.to(pre.device)
        flat = flat[torch.arange(m_max, device=pre.device)[:, None] < m.clamp(max=n)[None, :]]
    return flat_layout(pre, flat.reshape(-1))
