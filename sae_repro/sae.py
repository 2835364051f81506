"""The sparse autoencoder: encode / decode, save / load in the SAELens format, conversion.

    pre    = (x - b_dec) @ W_enc + b_enc          [n, n_latents]   (b_dec only if apply_b_dec_to_input)
    codes  = rule(pre)                             [n, n_latents]   kept entries relu(pre), others 0
    x_hat  = codes @ W_dec + b_dec                 [n, d_in]

W_enc [d_in, n_latents], W_dec [n_latents, d_in] (unit-norm rows while training), the SAELens
layout. The rule is one of `sparsity.RULES`, chosen by name in `SAEConfig.rule`.

Two paths compute the same thing:
- dense (`encode`, `decode` of a dense tensor, `forward`): plain autograd through the rules of
  `sparsity`; the reference, and what users call.
- sparse (`encode_sparse`, `forward_sparse`): codes as (token, latent) pairs
  (`SparseCodes`, the `F.embedding_bag` layout). The encoder matmul is the only dense product;
  the decoder and every backward touch only the active pairs. It is what `train` uses. One
  TopK train step at d_in=576, n_latents=4608, k=32, batch 4096 on one core of this machine
  (AMX): sparse 0.29 s with the encoder matmul in bf16, 0.46 s in fp32; dense 1.4 s / 1.6 s;
  SAELens' TopKTrainingSAE 2.0 s. The embedding_bag decoder takes ~20 ms, the matmul ~210 ms.

Batch rules (mutual / feature choice) select over the batch while training and update a
`ThresholdEMA`; in eval mode they apply the learned threshold (`inference="threshold"`, the
default) or the batch rule again (`inference="batch"`).

On disk an SAE is a SAELens folder: `cfg.json` + `sae_weights.safetensors`. The rule maps to the
SAELens architecture that reproduces our *inference* output (see `SAELENS_ARCHITECTURE`: batch
rules become JumpReLU with their learned thresholds, i.e. the `inference="threshold"` output;
SAELens has no inference-time batch rule, and its BatchTopK is saved as JumpReLU too); our
own fields live in `cfg.json["metadata"]["sae_repro"]`, which SAELens keeps but ignores (its
weight loader is strict, so no extra tensors go in the weights file; the ThresholdEMA state is
recovered from the jumprelu `threshold`: a latent has been seen iff its threshold is finite).
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass, fields
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from sae_repro.cache import atomic_path
from sae_repro.sparsity import (
    RULES,
    ThresholdEMA,
    feature_choice,
    gradient_topk,
    jumprelu,
    mutual_choice,
    relu,
    threshold_select,
    topk,
    zipf_capacities,
)

FORMAT_VERSION = 1
CFG_FILENAME, WEIGHTS_FILENAME = "cfg.json", "sae_weights.safetensors"
BATCH_RULES = ("mutual_choice", "feature_choice")
BUDGET_RULES = ("topk", "gradient_topk", "mutual_choice", "feature_choice")
# our rule -> the SAELens architecture with the same inference output
SAELENS_ARCHITECTURE = {
    "topk": "topk",
    "gradient_topk": "topk",  # without a gradient the g-SAE score is pre: plain TopK
    "mutual_choice": "jumprelu",  # threshold_select(pre, EMA threshold) == JumpReLU
    "feature_choice": "jumprelu",  # per-latent EMA thresholds
    "jumprelu": "jumprelu",
    "relu": "standard",
}
_SAELENS_TO_RULE = {"topk": "topk", "jumprelu": "jumprelu", "standard": "relu"}


# ----------------------------------------------------------------------------- config


@dataclass
class SAEConfig:
    """Everything that defines an SAE besides its weights (JSON-serialisable)."""

    d_in: int
    n_latents: int
    rule: str = "topk"
    k: int = 32  # topk / gradient_topk: per token; mutual_choice: average per token
    m: int | None = None  # feature choice capacity per latent; None -> k * n_tokens // n_latents
    capacity: str = "uniform"  # feature choice: "uniform" (m) or "zipf" (sparsity.zipf_capacities)
    zipf_exponent: float = 1.0
    beta: float = 0.0  # g-SAE: score = pre + beta * pre * |grad_x @ W_dec.T|
    threshold: float | None = None  # jumprelu: initial threshold of every latent (None -> 0)
    inference: str = "threshold"  # batch rules in eval mode: "threshold" (EMA) or "batch"
    threshold_decay: float = 0.99  # ThresholdEMA decay
    normalize_decoder: bool = True  # keep W_dec rows unit-norm while training
    apply_b_dec_to_input: bool = True  # subtract b_dec before the encoder (SAELens flag)
    normalize_activations: str = "none"  # SAELens flag; only "none" is supported
    hook_name: str | None = None  # where the SAE reads (SAELens metadata)
    model_name: str | None = None

    def __post_init__(self) -> None:
        for name in ("d_in", "n_latents", "k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SAEConfig: {name} must be a positive int, got {name}={v!r}")
        if self.rule not in RULES:
            raise ValueError(f"SAEConfig: rule={self.rule!r} is unknown; valid rules: {', '.join(sorted(RULES))}")
        if self.rule in BUDGET_RULES and self.k > self.n_latents:
            raise ValueError(f"SAEConfig: k={self.k} must be <= n_latents={self.n_latents}")
        if self.m is not None and (isinstance(self.m, bool) or not isinstance(self.m, int) or self.m < 1):
            raise ValueError(f"SAEConfig: m must be None or a positive int, got m={self.m!r}")
        if self.capacity not in ("uniform", "zipf"):
            raise ValueError(f"SAEConfig: capacity={self.capacity!r}; allowed: 'uniform', 'zipf'")
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"SAEConfig: beta must be a finite float >= 0, got beta={self.beta!r}")
        if self.inference not in ("threshold", "batch"):
            raise ValueError(f"SAEConfig: inference={self.inference!r}; allowed: 'threshold', 'batch'")
        if not 0.0 <= self.threshold_decay < 1.0:
            raise ValueError(f"SAEConfig: threshold_decay must be in [0, 1), got {self.threshold_decay}")
        if self.threshold is not None and math.isnan(self.threshold):
            raise ValueError("SAEConfig: threshold must be a real number or None, got nan")
        if self.normalize_activations != "none":
            raise ValueError(f"SAEConfig: normalize_activations={self.normalize_activations!r} is not "
                             f"supported; only 'none' (normalise the activations before the SAE)")


# ----------------------------------------------------------------------------- sparse kernels


def _segment_sum(idx: Tensor, bag: Tensor, weights: Tensor, rows: Tensor, n_out: int) -> Tensor:
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
            g_W = _segment_sum(idx, bag, vals, grad_out, W_dec.shape[0])
        return g_vals, g_W, None, None, None


def sparse_decode(vals: Tensor, idx: Tensor, offsets: Tensor, bag: Tensor, W_dec: Tensor) -> Tensor:
    """sum_p vals[p] W_dec[idx[p]] per token (no b_dec), differentiable wrt vals and W_dec.

    vals, idx, bag: [P] pairs sorted by token (bag = token of each pair); offsets: [n_tokens].
    """
    return _SparseDecode.apply(vals.to(W_dec.dtype), W_dec, idx, offsets, bag)


class _GatherPre(torch.autograd.Function):
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
            g_W = _segment_sum(idx, bag, g, x_c, W_enc.shape[1]).t()
        if need[3] or need[4]:
            g_b = torch.zeros(W_enc.shape[1], dtype=g.dtype, device=g.device).index_add_(0, idx, g)
        if need[1]:
            g_x = F.embedding_bag(idx, W_enc.t().contiguous(), offsets, mode="sum", per_sample_weights=g)
        if need[4] and ctx.use_b_dec:
            g_bd = -(g_x.sum(0) if g_x is not None else W_enc @ g_b)
        return None, g_x, g_W, g_b if need[3] else None, g_bd, None, None, None, None, None


class _TakeCols(torch.autograd.Function):
    """W[:, cols] whose backward scatters into a gradient laid out like W.

    Plain indexing's backward builds a row-major zero tensor; for W_enc (stored transposed, see
    SparseAutoencoder.__init__) that forces a transposed add and a transposed copy of the full
    [d, L] gradient (~70 ms a step at 18k latents) for the few dead latents AuxK trains.
    """

    @staticmethod
    def forward(ctx, W: Tensor, cols: Tensor) -> Tensor:
        ctx.save_for_backward(cols)
        ctx.like = W
        return W[:, cols]

    @staticmethod
    def backward(ctx, g: Tensor):
        (cols,) = ctx.saved_tensors
        return torch.zeros_like(ctx.like).index_copy_(1, cols, g.to(ctx.like.dtype)), None


def _flat_topk_indices(flat: Tensor, M: int) -> Tensor:
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


class ForwardOutput(NamedTuple):
    """What a training forward returns (the train step and the auxiliary losses read all of it)."""

    x_hat: Tensor  # [n, d_in]
    codes: SparseCodes | Tensor  # pairs (sparse path) or dense [n, n_latents] (dense path)
    pre: Tensor  # [n, n_latents] pre-activations; detached in the sparse path
    pre_cols: Callable[[Tensor], Tensor] | None  # cols [j] -> pre[:, cols] [n, j] with autograd
    bf16: bool = False  # the forward ran its encoder matmul under bf16 autocast


def _rows_layout(pre: Tensor, cols: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """cols [n, j] latents per token -> (pre values, idx, bag, offsets) of the n*j pairs."""
    n, j = cols.shape
    bag = torch.arange(n, device=pre.device).repeat_interleave(j)
    offsets = torch.arange(0, n * j, j, device=pre.device)
    return pre.gather(1, cols).reshape(-1), cols.reshape(-1), bag, offsets


def _flat_layout(pre: Tensor, flat: Tensor, is_sorted: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """flat indices into pre.view(-1) (any order) -> (pre values, idx, bag, offsets) sorted by token."""
    n, L = pre.shape
    if not is_sorted:
        flat = (flat.int().sort().values if pre.numel() < 2**31 else flat.sort().values).long()
    bag, idx = flat // L, flat % L
    counts = torch.bincount(bag, minlength=n)
    return pre.view(-1)[flat], idx, bag, counts.cumsum(0) - counts


# ----------------------------------------------------------------------------- the model


class SparseAutoencoder(nn.Module):
    """An SAE with a named sparsity rule.  See the module docstring for the equations."""

    W_enc: nn.Parameter  # [d_in, n_latents]
    b_enc: nn.Parameter  # [n_latents]
    W_dec: nn.Parameter  # [n_latents, d_in]
    b_dec: nn.Parameter  # [d_in]

    def __init__(self, cfg: SAEConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        d, L = cfg.d_in, cfg.n_latents
        # sparsify / OpenAI init: random unit decoder rows, tied encoder, zero biases
        g = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(L, d, generator=g)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        # clone keeps the transpose's strides: W_enc [d, L] is stored latent-major, like W_dec,
        # which is the layout the sparse backward (_segment_sum) writes its gradient in
        self.W_enc = nn.Parameter(W_dec.t().clone())
        self.b_enc = nn.Parameter(torch.zeros(L))
        self.b_dec = nn.Parameter(torch.zeros(d))
        if cfg.rule in BATCH_RULES:
            self.ema = ThresholdEMA(L, cfg.threshold_decay, per_latent=cfg.rule == "feature_choice")
        if cfg.rule == "jumprelu":
            self.register_buffer("threshold", torch.full((L,), cfg.threshold or 0.0))
        self._zipf_cache: dict[int, Tensor] = {}

    # --------------------------------------------------------------------- checks and helpers

    def _check_x(self, x: Any, name: str = "x") -> None:
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor [n_tokens, d_in={self.cfg.d_in}], got {type(x).__name__}")
        if x.ndim != 2 or x.shape[1] != self.cfg.d_in:
            raise ValueError(f"{name} must have shape [n_tokens, d_in={self.cfg.d_in}], got {tuple(x.shape)} "
                             f"(flatten batch and position dims first)")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got dtype {x.dtype}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or inf values; only finite values are allowed")

    def _check_grad(self, grad: Tensor, x: Tensor) -> None:
        self._check_x(grad, "latent_grad_from")
        if grad.shape != x.shape:
            raise ValueError(f"latent_grad_from must have x's shape {tuple(x.shape)}, got {tuple(grad.shape)}")

    @torch.no_grad()
    def calibrate_threshold(self, x: Tensor, batch_size: int, max_batches: int = 16) -> None:
        """Batch rules: re-learn the inference threshold with the final weights.

        The EMA kept during training lags weights that are still moving (in short runs the
        threshold-inference L0 was far from k). This resets it to the running mean, over up to
        `max_batches` full batches of x [n, d_in], of the smallest activation the batch rule selects
        (per latent for Feature Choice), so inference keeps about the training budget.
        """
        if self.cfg.rule not in BATCH_RULES:
            return
        n = x.shape[0]
        if n < batch_size:
            raise ValueError(f"calibrate_threshold: need at least batch_size={batch_size} tokens, got {n}")
        was_training, decay = self.training, self.ema.decay
        self.train()
        self.ema.threshold.fill_(math.inf)
        self.ema.seen.zero_()
        try:
            for i in range(min(max_batches, n // batch_size)):
                self.ema.decay = i / (i + 1)  # EMA with this decay = running mean
                batch = x[i * batch_size:(i + 1) * batch_size].to(self.W_enc.device).float()
                self._rule_dense(self.pre_acts(batch), None)
        finally:
            self.ema.decay = decay
            self.train(was_training)

    def capacities(self, n_tokens: int) -> int | Tensor:
        """Feature choice capacity for a batch of n_tokens: an int m or a LongTensor [n_latents]."""
        cfg = self.cfg
        if cfg.capacity == "zipf":
            if n_tokens not in self._zipf_cache:
                self._zipf_cache[n_tokens] = zipf_capacities(
                    cfg.n_latents, cfg.k * n_tokens, cfg.zipf_exponent, max_capacity=n_tokens)
            return self._zipf_cache[n_tokens]
        m = cfg.m if cfg.m is not None else max(1, cfg.k * n_tokens // cfg.n_latents)
        return min(m, n_tokens)

    def _use_threshold(self) -> bool:
        return self.cfg.rule in BATCH_RULES and not self.training and self.cfg.inference == "threshold"

    def _latent_grad(self, grad: Tensor, bf16: bool = False) -> Tensor:
        """grad_x @ W_dec.T: the loss gradient seen by each latent's direction.  -> [n, n_latents]."""
        with torch.autocast(grad.device.type, dtype=torch.bfloat16, enabled=bf16):
            return grad @ self.W_dec.detach().t()

    def _ema_update(self, codes: SparseCodes) -> None:
        """ThresholdEMA.update from pairs, via a small matrix with the same (per-latent) minima."""
        vals = codes.vals.detach()
        if not self.ema.per_latent:
            self.ema.update(vals.view(1, -1))
            return
        pos = torch.where(vals > 0, vals.float(), math.inf)
        mins = torch.full((self.cfg.n_latents,), math.inf, device=pos.device).scatter_reduce_(0, codes.idx, pos, "amin")
        self.ema.update(torch.where(torch.isfinite(mins), mins, 0.0).view(1, -1))

    # --------------------------------------------------------------------- dense path (reference)

    def pre_acts(self, x: Tensor) -> Tensor:
        """(x - b_dec) @ W_enc + b_enc.  x: [n, d_in] -> [n, n_latents]."""
        self._check_x(x)
        x = x.to(self.W_enc.dtype)
        x_c = x - self.b_dec if self.cfg.apply_b_dec_to_input else x
        return torch.addmm(self.b_enc, x_c, self.W_enc)

    def encode(self, x: Tensor, latent_grad_from: Tensor | None = None) -> Tensor:
        """Dense codes [n, n_latents] by the rule (autograd through `sparsity`).

        latent_grad_from: grad_x [n, d_in] for gradient_topk (g-SAE); without it the score is pre,
        i.e. plain TopK (what a g-SAE does at inference without a gradient).
        Batch rules in training mode also update the ThresholdEMA.
        """
        pre = self.pre_acts(x)
        if latent_grad_from is not None:
            self._check_grad(latent_grad_from, x)
        return self._rule_dense(pre, latent_grad_from)

    def _rule_dense(self, pre: Tensor, grad: Tensor | None, bf16: bool = False) -> Tensor:
        cfg = self.cfg
        if cfg.rule == "topk" or (cfg.rule == "gradient_topk" and grad is None):
            return topk(pre, cfg.k, validate=False)
        if cfg.rule == "gradient_topk":
            return gradient_topk(pre, self._latent_grad(grad, bf16).float(), cfg.k, cfg.beta, validate=False)
        if cfg.rule == "jumprelu":
            return jumprelu(pre, self.threshold, validate=False)
        if cfg.rule == "relu":
            return relu(pre, validate=False)
        if self._use_threshold():
            return threshold_select(pre, self.ema.threshold, validate=False)
        if cfg.rule == "mutual_choice":
            codes = mutual_choice(pre, cfg.k, validate=False)
        else:
            codes = feature_choice(pre, self.capacities(pre.shape[0]), validate=False)
        if self.training:
            self.ema.update(codes)
        return codes

    def decode(self, codes: Tensor | SparseCodes) -> Tensor:
        """codes @ W_dec + b_dec -> [n, d_in].

        SparseCodes go through embedding_bag; a dense tensor with at most 1/32 non-zero entries is
        converted to pairs first, else a plain matmul. Measured at n=4096, 4608 x 576, 1 core:
        density 0.7% 118 ms vs 213 ms for the matmul (conversion included; 20 ms from pairs),
        4% about even, 8% 336 vs 214 ms.
        """
        if isinstance(codes, SparseCodes):
            return sparse_decode(codes.vals, codes.idx, codes.offsets, codes.bag, self.W_dec) + self.b_dec
        if not isinstance(codes, Tensor) or codes.ndim != 2 or codes.shape[1] != self.cfg.n_latents:
            got = tuple(codes.shape) if isinstance(codes, Tensor) else type(codes).__name__
            raise ValueError(f"codes must have shape [n_tokens, n_latents={self.cfg.n_latents}], got {got}")
        if int(torch.count_nonzero(codes)) * 32 <= codes.numel():
            return self.decode(SparseCodes.from_dense(codes))
        return self.decode_dense(codes)

    def decode_dense(self, codes: Tensor) -> Tensor:
        """codes @ W_dec + b_dec as a plain matmul.  codes: [n, n_latents] -> [n, d_in]."""
        return codes.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: Tensor, grad: Tensor | None = None, *, path: str | None = None,
                bf16: bool = False, validate: bool = True) -> tuple[Tensor, Tensor] | ForwardOutput:
        """(x_hat [n, d_in], codes [n, n_latents]) by `encode` + `decode`.

        path="sparse" / "dense" returns the training `ForwardOutput` of `forward_sparse` /
        `forward_dense` instead (through forward, so a DDP wrapper sees the training computation).
        validate=False skips the input checks (one pass over x) for data checked once up front.
        """
        if path == "sparse":
            return self.forward_sparse(x, grad, bf16=bf16, validate=validate)
        if path == "dense":
            return self.forward_dense(x, grad, bf16=bf16, validate=validate)
        if path is not None:
            raise ValueError(f"forward: path={path!r}; allowed: None, 'sparse', 'dense'")
        codes = self.encode(x, grad)
        return self.decode(codes), codes

    def forward_dense(self, x: Tensor, grad: Tensor | None = None, *, bf16: bool = False,
                      validate: bool = True) -> ForwardOutput:
        """The reference training forward: dense autograd, matmul decoder (bf16: encoder matmul
        under autocast).  -> ForwardOutput(x_hat, dense codes, pre with autograd, pre_cols=None)."""
        if validate:
            self._check_x(x)
            if grad is not None:
                self._check_grad(grad, x)
        x = x.to(self.W_enc.dtype)
        x_c = x - self.b_dec if self.cfg.apply_b_dec_to_input else x
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            pre = torch.addmm(self.b_enc, x_c, self.W_enc)
        pre = pre.float()
        codes = self._rule_dense(pre, grad, bf16)
        return ForwardOutput(self.decode_dense(codes), codes, pre, None, bf16)

    # --------------------------------------------------------------------- sparse path (training)

    def _select(self, pre: Tensor, grad: Tensor | None, bf16: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The rule's active pairs: (pre values, idx, bag, offsets), sorted by token."""
        cfg, (n, L) = self.cfg, pre.shape
        if cfg.rule == "gradient_topk" and grad is not None:
            # pre + beta * pre * |latent_grad| (as sparsity.gradient_topk), in place, in pre's dtype
            score = torch.addcmul(pre, pre, self._latent_grad(grad, bf16).to(pre.dtype).abs_(), value=cfg.beta)
            return _rows_layout(pre, score.topk(cfg.k, dim=-1, sorted=False).indices)
        if cfg.rule in ("topk", "gradient_topk"):
            return _rows_layout(pre, pre.topk(cfg.k, dim=-1, sorted=False).indices)
        if cfg.rule in ("jumprelu", "relu") or self._use_threshold():
            thr = {"jumprelu": getattr(self, "threshold", None), "relu": 0.0}.get(cfg.rule)
            thr = self.ema.threshold if thr is None else thr
            mask = (pre > thr) & (pre > 0)
            return _flat_layout(pre, mask.view(-1).nonzero().squeeze(1), is_sorted=True)
        if cfg.rule == "mutual_choice":
            return _flat_layout(pre, _flat_topk_indices(pre.view(-1), cfg.k * n))
        m = self.capacities(n)  # feature choice: each latent takes its top-m tokens
        m_max = int(m.max()) if isinstance(m, Tensor) else m
        # topk along rows of the transposed copy: ~1.6x faster than along dim 0 on CPU
        tok = pre.t().contiguous().topk(m_max, dim=1, sorted=isinstance(m, Tensor)).indices.t()  # [m_max, L]
        flat = tok * L + torch.arange(L, device=pre.device)
        if isinstance(m, Tensor):
            m = m.to(pre.device)
            flat = flat[torch.arange(m_max, device=pre.device)[:, None] < m.clamp(max=n)[None, :]]
        return _flat_layout(pre, flat.reshape(-1))

    def encode_sparse(self, x: Tensor, latent_grad_from: Tensor | None = None, *, bf16: bool = False,
                      validate: bool = True) -> tuple[SparseCodes, Tensor, Callable[[Tensor], Tensor]]:
        """Fast encode -> (SparseCodes, pre [n, L] detached, pre_cols).

        Same codes as `encode`. The encoder matmul runs under bf16 autocast if `bf16`; the values
        then carry bf16 rounding but their gradients are exact fp32 sparse products.
        pre_cols(cols [j]) -> pre[:, cols] [n, j] recomputed with autograd (same autocast): the
        auxiliary losses use it for the dead latents, whose top-k_aux per token are too many
        (k_aux ~ d/2) for the pair kernels to beat a matmul on that column block.
        """
        if validate:
            self._check_x(x)
            if latent_grad_from is not None:
                self._check_grad(latent_grad_from, x)
        use_b_dec = self.cfg.apply_b_dec_to_input
        x = x.to(self.W_enc.dtype)
        with torch.no_grad():
            x_c = x - self.b_dec if use_b_dec else x
            # bf16: pre stays bf16 (bias fused in the matmul; an fp32 copy of [n, L] costs
            # more than the AMX matmul itself), selection runs on it, values are upcast
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                pre = torch.addmm(self.b_enc, x_c, self.W_enc)
            pre_vals, idx, bag, offsets = self._select(pre, latent_grad_from, bf16)
        vals = _GatherPre.apply(pre_vals.float(), x, self.W_enc, self.b_enc, self.b_dec, x_c, idx,
                                offsets, bag, use_b_dec)
        codes = SparseCodes(vals, idx, bag, offsets, self.cfg.n_latents)
        if self.training and self.cfg.rule in BATCH_RULES:
            self._ema_update(codes)

        def pre_cols(cols: Tensor) -> Tensor:
            x_in = x - self.b_dec if use_b_dec else x
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                return torch.addmm(self.b_enc[cols], x_in, _TakeCols.apply(self.W_enc, cols))

        return codes, pre, pre_cols

    def forward_sparse(self, x: Tensor, grad: Tensor | None = None, *, bf16: bool = False,
                       validate: bool = True) -> ForwardOutput:
        """encode_sparse + embedding_bag decode -> ForwardOutput(x_hat, codes, pre, pre_cols, bf16)."""
        codes, pre, pre_cols = self.encode_sparse(x, grad, bf16=bf16, validate=validate)
        return ForwardOutput(self.decode(codes), codes, pre, pre_cols, bf16)

    # --------------------------------------------------------------------- training helpers

    @torch.no_grad()
    def set_decoder_norm_to_unit(self) -> None:
        """Rescale each decoder row to unit norm (in place)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out of W_dec.grad its component along each decoder row (OpenAI TopK, sparsify):
        with unit rows kept by renormalising, that component only changes the norm, which the
        renormalisation undoes, so it would only add noise to Adam's moments."""
        if self.W_dec.grad is None:
            return
        w, g = self.W_dec, self.W_dec.grad
        # row-wise dots as [L, 1, d] @ [L, d, 1]: no [L, d] temporaries (this runs every step)
        dots = torch.bmm(g.unsqueeze(1), w.unsqueeze(2)).squeeze(2)  # [L, 1]
        coef = dots / w.norm(dim=1, keepdim=True).square().clamp_min(1e-12)
        g.addcmul_(coef, w, value=-1.0)

    @torch.no_grad()
    def init_b_dec(self, x_sample: Tensor, method: str = "geometric_median", n_iter: int = 10) -> None:
        """Set b_dec from data: the geometric median (Weiszfeld iterations from the mean), the
        mean, or zero. A zero b_dec left about half the latents of a TopK SAE dead here."""
        self._check_x(x_sample, "x_sample")
        if method not in ("geometric_median", "mean", "zero"):
            raise ValueError(f"init_b_dec: method={method!r}; allowed: 'geometric_median', 'mean', 'zero'")
        x = x_sample.double()
        b = x.mean(0) if method != "zero" else torch.zeros_like(x[0])
        for _ in range(n_iter if method == "geometric_median" else 0):
            w = 1.0 / (x - b).norm(dim=1).clamp_min(1e-8)
            b = (w[:, None] * x).sum(0) / w.sum()
        self.b_dec.copy_(b.to(self.b_dec.dtype))

    # --------------------------------------------------------------------- SAELens format

    def sae_lens_dict(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """(cfg.json dict, weights) in the SAELens 6.x format; see SAELENS_ARCHITECTURE."""
        cfg = self.cfg
        arch = SAELENS_ARCHITECTURE[cfg.rule]
        try:
            version = importlib_metadata.version("sae-lens")
        except importlib_metadata.PackageNotFoundError:
            version = "6.0.0"
        meta: dict[str, Any] = {"sae_lens_version": version, "sae_lens_training_version": version,
                                "sae_repro": {**asdict(cfg), "format_version": FORMAT_VERSION}}
        if cfg.hook_name is not None:
            meta["hook_name"] = cfg.hook_name
        if cfg.model_name is not None:
            meta["model_name"] = cfg.model_name
        out: dict[str, Any] = {
            "architecture": arch, "d_in": cfg.d_in, "d_sae": cfg.n_latents, "dtype": "float32",
            "device": "cpu", "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
            "normalize_activations": "none", "reshape_activations": "none", "metadata": meta,
        }
        weights = {name: getattr(self, name).detach().float().contiguous().cpu()
                   for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
        if arch == "topk":
            out.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
        elif cfg.rule == "jumprelu":
            weights["threshold"] = self.threshold.detach().float().clone()
        elif arch == "jumprelu":  # batch rule: its inference threshold (inf = never fired)
            weights["threshold"] = self.ema.threshold.detach().float().expand(cfg.n_latents).clone()
        return out, weights

    def save(self, path: str | Path) -> Path:
        """Write the SAELens folder `path` (cfg.json + sae_weights.safetensors) atomically."""
        cfg_dict, weights = self.sae_lens_dict()
        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.mkdir()
            save_file(weights, tmp / WEIGHTS_FILENAME)
            (tmp / CFG_FILENAME).write_text(json.dumps(cfg_dict, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SparseAutoencoder":
        """Load a folder written by `save` or by SAELens (`save_model`); returns it in eval mode."""
        path = Path(path)
        if not (path / CFG_FILENAME).exists() or not (path / WEIGHTS_FILENAME).exists():
            raise ValueError(f"load: {path} is not an SAE folder; expected {CFG_FILENAME} and {WEIGHTS_FILENAME} in it")
        cfg_dict = json.loads((path / CFG_FILENAME).read_text())
        return cls.from_sae_lens_dict(cfg_dict, load_file(path / WEIGHTS_FILENAME))

    @classmethod
    def from_sae_lens(cls, sae_or_path: Any) -> "SparseAutoencoder":
        """An SAELens SAE object (TopKSAE, JumpReLUSAE, StandardSAE) or a folder it saved -> ours."""
        if isinstance(sae_or_path, (str, Path)):
            return cls.load(sae_or_path)
        if not hasattr(sae_or_path, "cfg") or not hasattr(sae_or_path.cfg, "to_dict"):
            raise ValueError(f"from_sae_lens: expected a sae_lens SAE or a folder path, "
                             f"got {type(sae_or_path).__name__}")
        state = {k: v.detach().cpu() for k, v in sae_or_path.state_dict().items()}
        return cls.from_sae_lens_dict(sae_or_path.cfg.to_dict(), state)

    @classmethod
    def from_sae_lens_dict(cls, cfg_dict: dict[str, Any], weights: dict[str, Tensor]) -> "SparseAutoencoder":
        """Build from a SAELens cfg dict + state dict, folding flags we do not keep as such."""
        meta = cfg_dict.get("metadata") or {}
        ours = meta.get("sae_repro") if isinstance(meta, dict) else None
        arch = cfg_dict.get("architecture", "standard")
        if ours is not None:
            cfg = SAEConfig(**{f.name: ours[f.name] for f in fields(SAEConfig) if f.name in ours})
        else:
            if arch not in _SAELENS_TO_RULE:
                raise ValueError(f"from_sae_lens: architecture={arch!r} is not supported; supported: "
                                 f"{', '.join(sorted(_SAELENS_TO_RULE))}")
            for flag, ok in [("normalize_activations", "none"), ("reshape_activations", "none")]:
                if cfg_dict.get(flag, ok) != ok:
                    raise ValueError(f"from_sae_lens: {flag}={cfg_dict[flag]!r} is not supported; only {ok!r}")
            if cfg_dict.get("finetuning_scaling_factor"):
                raise ValueError("from_sae_lens: finetuning_scaling_factor=True is not supported")
            cfg = SAEConfig(
                d_in=int(cfg_dict["d_in"]), n_latents=int(cfg_dict["d_sae"]), rule=_SAELENS_TO_RULE[arch],
                k=int(cfg_dict.get("k", 1)) if arch == "topk" else 1,
                apply_b_dec_to_input=bool(cfg_dict.get("apply_b_dec_to_input", True)),
                normalize_decoder=False,  # keep the loaded decoder as it is
                hook_name=meta.get("hook_name"), model_name=meta.get("model_name"))
        sae = cls(cfg)
        w = {k: v.float() for k, v in weights.items()}
        expected = {"W_enc": (cfg.d_in, cfg.n_latents), "b_enc": (cfg.n_latents,),
                    "W_dec": (cfg.n_latents, cfg.d_in), "b_dec": (cfg.d_in,)}
        if cfg.rule == "jumprelu":
            expected["threshold"] = (cfg.n_latents,)
        for name, shape in expected.items():
            if name not in w or tuple(w[name].shape) != shape:
                got = tuple(w[name].shape) if name in w else "missing"
                raise ValueError(f"from_sae_lens: weight {name} must have shape {shape}, got {got}")
        if arch == "topk" and ours is None and cfg_dict.get("rescale_acts_by_decoder_norm", False):
            # SAELens selects on pre * |W_dec row| and decodes codes / |W_dec row|: fold the norms
            norm = w["W_dec"].norm(dim=1)
            w["W_enc"], w["b_enc"], w["W_dec"] = w["W_enc"] * norm, w["b_enc"] * norm, w["W_dec"] / norm[:, None]
        with torch.no_grad():
            for name in expected:
                getattr(sae, name).copy_(w[name])
            if cfg.rule in BATCH_RULES and "threshold" in w:
                thr = w["threshold"] if sae.ema.per_latent else w["threshold"][0]
                sae.ema.threshold.copy_(thr)
                sae.ema.seen.copy_(torch.isfinite(thr))
        return sae.eval()

    def to_sae_lens(self):
        """This SAE as a sae_lens SAE object (via a temporary SAELens folder)."""
        from sae_lens import SAE  # lazy: importing sae_lens costs ~10 s

        with tempfile.TemporaryDirectory() as tmp:
            return SAE.load_from_disk(self.save(Path(tmp) / "sae"))


def load_pretrained(spec: str, device: str = "cpu") -> SparseAutoencoder:
    """An SAE trained elsewhere, in eval mode: a folder in the SAELens format, or
    "release:sae_id" from SAELens's registry of pretrained SAEs (which downloads from the model
    hub: for users online), e.g. "gpt2-small-res-jb:blocks.7.hook_resid_pre". Architectures and
    input normalisations we do not support raise a ValueError naming them."""
    path = Path(spec)
    if path.is_dir():
        return SparseAutoencoder.load(path).to(device)
    if ":" not in spec:
        raise ValueError(f"pretrained SAE {spec!r}: expected a folder in the SAELens format or "
                         f"'release:sae_id' such as 'gpt2-small-res-jb:blocks.7.hook_resid_pre'")
    from sae_lens import SAE  # lazy: importing sae_lens costs ~10 s

    release, sae_id = spec.split(":", 1)
    return SparseAutoencoder.from_sae_lens(SAE.from_pretrained(release, sae_id, device="cpu")).to(device)

