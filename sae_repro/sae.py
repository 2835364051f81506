"""The sparse autoencoder: its config, encode / decode, and the sparse training forward.

    pre    = (x - b_dec) @ W_enc + b_enc          [n, n_latents]   (b_dec only if apply_b_dec_to_input)
    codes  = rule(pre)                             [n, n_latents]   kept entries relu(pre), others 0
    x_hat  = codes @ W_dec + b_dec                 [n, d_in]

W_enc [d_in, n_latents], W_dec [n_latents, d_in] (unit-norm rows while training), the SAELens
layout. The rule is one of `sparsity.RULES`, chosen by name in `SAEConfig.rule`.

Two paths compute the same thing:
- dense (`encode`, `decode` of a dense tensor, `forward`): plain autograd through the rules of
  `sparsity`; the reference, and what users call.
- sparse (`encode_sparse`, `forward_sparse`): codes as (token, latent) pairs (`SparseCodes`) and
  the pair kernels of `sae_repro.kernels`: the encoder matmul is the only dense product. It is
  what `train` uses.

Batch rules (mutual / feature choice) select over the batch while training and update a
`ThresholdEMA`; in eval mode they apply the learned threshold (`inference="threshold"`, the
default) or the batch rule again (`inference="batch"`).

Saving, loading and the SAELens conversion are in `sae_repro.saelens` (`save(sae, path)`,
`load(path)`, `from_sae_lens`, `to_sae_lens`, `load_pretrained`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor, nn

from sae_repro.kernels import GatherPre, SparseCodes, rows_layout, select_pairs, sparse_decode
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

BATCH_RULES = ("mutual_choice", "feature_choice")
BUDGET_RULES = ("topk", "gradient_topk", "mutual_choice", "feature_choice")


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


# ----------------------------------------------------------------------------- outputs


class ForwardOutput(NamedTuple):
    """What a training forward returns (the train step and the auxiliary losses read all of it)."""

    x_hat: Tensor  # [n, d_in]
    codes: SparseCodes | Tensor  # pairs (sparse path) or dense [n, n_latents] (dense path)
    pre: Tensor  # [n, n_latents] pre-activations; detached in the sparse path
    pre_pairs: Callable[[Tensor], SparseCodes] | None  # latents [n, j] -> those pairs with autograd
    bf16: bool = False  # the forward ran its encoder matmul under bf16 autocast


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
        self._pre_buffer: Tensor | None = None  # encode_sparse(reuse=True) writes pre here

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
                bf16: bool = False, validate: bool = True,
                reuse: bool = False) -> tuple[Tensor, Tensor] | ForwardOutput:
        """(x_hat [n, d_in], codes [n, n_latents]) by `encode` + `decode`.

        path="sparse" / "dense" returns the training `ForwardOutput` of `forward_sparse` /
        `forward_dense` instead (through forward, so a DDP wrapper sees the training computation).
        validate=False skips the input checks (one pass over x) for data checked once up front;
        reuse=True (sparse path) lets the pre-activations overwrite the previous call's.
        """
        if path == "sparse":
            return self.forward_sparse(x, grad, bf16=bf16, validate=validate, reuse=reuse)
        if path == "dense":
            return self.forward_dense(x, grad, bf16=bf16, validate=validate)
        if path is not None:
            raise ValueError(f"forward: path={path!r}; allowed: None, 'sparse', 'dense'")
        codes = self.encode(x, grad)
        return self.decode(codes), codes

    def forward_dense(self, x: Tensor, grad: Tensor | None = None, *, bf16: bool = False,
                      validate: bool = True) -> ForwardOutput:
        """The reference training forward: dense autograd, matmul decoder (bf16: encoder matmul
        under autocast).  -> ForwardOutput(x_hat, dense codes, pre with autograd, pre_pairs=None)."""
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
        cfg = self.cfg
        if cfg.rule == "gradient_topk" and grad is not None:
            # pre + beta * pre * |latent_grad| (as sparsity.gradient_topk), in place, in pre's dtype
            score = torch.addcmul(pre, pre, self._latent_grad(grad, bf16).to(pre.dtype).abs_(), value=cfg.beta)
            return select_pairs(pre, "topk", k=cfg.k, score=score)
        if cfg.rule in ("topk", "gradient_topk"):
            return select_pairs(pre, "topk", k=cfg.k)
        if cfg.rule in ("jumprelu", "relu") or self._use_threshold():
            thr = {"jumprelu": getattr(self, "threshold", None), "relu": 0.0}.get(cfg.rule)
            return select_pairs(pre, "threshold", threshold=self.ema.threshold if thr is None else thr)
        if cfg.rule == "mutual_choice":
            return select_pairs(pre, "mutual_choice", k=cfg.k)
        return select_pairs(pre, "feature_choice", capacity=self.capacities(pre.shape[0]))

    def _encoder_matmul(self, x_c: Tensor, bf16: bool, reuse: bool) -> Tensor:
        """pre = x_c @ W_enc + b_enc, no autograd -> [n, L] (bf16 if `bf16`, as autocast gives).

        bf16: pre stays bf16 (an fp32 copy of [n, L] costs more than the AMX matmul itself);
        selection runs on it and the selected values are upcast. reuse: write into a [n, L]
        buffer kept on the module across calls instead of a fresh tensor: a fresh 75 MB output
        at n=4096, 4608 latents is page-faulted in on every call, ~20% of the matmul's time on
        CPU (bench/README.md). The previous call's pre is then overwritten.
        """
        dt = torch.bfloat16 if bf16 else self.W_enc.dtype
        b, x_c, W = self.b_enc.to(dt), x_c.to(dt), self.W_enc.to(dt)  # the casts autocast makes
        # Feature Choice selects along tokens: compute pre^T [L, n] (pre^T = W_enc^T x_c^T + b)
        # and return its transposed view, instead of a transposed copy of pre (100 ms at n=4096)
        latent_major = self.cfg.rule == "feature_choice" and not self._use_threshold()
        shape = (self.cfg.n_latents, x_c.shape[0]) if latent_major else (x_c.shape[0], self.cfg.n_latents)
        buf = None
        if reuse:
            buf = self._pre_buffer
            if buf is None or buf.shape != shape or buf.dtype != dt or buf.device != x_c.device:
                buf = self._pre_buffer = torch.empty(shape, dtype=dt, device=x_c.device)
        if latent_major:
            return torch.addmm(b[:, None], W.t(), x_c.t(), out=buf).t()
        return torch.addmm(b, x_c, W, out=buf)

    def encode_sparse(self, x: Tensor, latent_grad_from: Tensor | None = None, *, bf16: bool = False,
                      validate: bool = True,
                      reuse: bool = False) -> tuple[SparseCodes, Tensor, Callable[[Tensor], SparseCodes]]:
        """Fast encode -> (SparseCodes, pre [n, L] detached, pre_pairs).

        Same codes as `encode`. The encoder matmul runs in bf16 if `bf16` (as under autocast); the
        values then carry bf16 rounding but their gradients are exact fp32 sparse products.
        reuse=True writes pre into a buffer the next call overwrites (the training step's use).
        pre_pairs(latents [n, j]) -> SparseCodes of relu(pre) at (token t, latents[t]) with the
        same exact gradient: the auxiliary losses pick each token's top k_aux dead latents on the
        detached pre and train only those pairs, instead of recomputing the [n, n_dead] column
        block with autograd (at 16x width and 37% dead latents that block cost 2/3 of a step).
        It reads pre, so it must run before the next reuse=True call overwrites the buffer.
        """
        if validate:
            self._check_x(x)
            if latent_grad_from is not None:
                self._check_grad(latent_grad_from, x)
        use_b_dec = self.cfg.apply_b_dec_to_input
        x = x.to(self.W_enc.dtype)
        with torch.no_grad():
            x_c = x - self.b_dec if use_b_dec else x
            pre = self._encoder_matmul(x_c, bf16, reuse)
            pre_vals, idx, bag, offsets = self._select(pre, latent_grad_from, bf16)
        vals = GatherPre.apply(pre_vals.float(), x, self.W_enc, self.b_enc, self.b_dec, x_c, idx,
                                offsets, bag, use_b_dec)
        codes = SparseCodes(vals, idx, bag, offsets, self.cfg.n_latents)
        if self.training and self.cfg.rule in BATCH_RULES:
            self._ema_update(codes)

        def pre_pairs(latents: Tensor) -> SparseCodes:
            pv, idx, bag, offsets = rows_layout(pre, latents)
            vals = GatherPre.apply(pv.float(), x, self.W_enc, self.b_enc, self.b_dec, x_c, idx, offsets, bag,
                                   use_b_dec)
            return SparseCodes(vals, idx, bag, offsets, self.cfg.n_latents)

        return codes, pre, pre_pairs

    def forward_sparse(self, x: Tensor, grad: Tensor | None = None, *, bf16: bool = False,
                       validate: bool = True, reuse: bool = False) -> ForwardOutput:
        """encode_sparse + embedding_bag decode -> ForwardOutput(x_hat, codes, pre, pre_pairs, bf16)."""
        codes, pre, pre_pairs = self.encode_sparse(x, grad, bf16=bf16, validate=validate, reuse=reuse)
        return ForwardOutput(self.decode(codes), codes, pre, pre_pairs, bf16)

    # --------------------------------------------------------------------- training helpers

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
