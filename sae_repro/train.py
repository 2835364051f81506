"""Train an SAE on cached activations: Adam, warmup + final linear decay, AuxK, checkpoints.

    sae, history = train_sae(x, TrainConfig(k=32, expansion=8))      # x: [n_tokens, d_in]

One step (`train_step`): sparse forward (bf16 encoder matmul if cfg.bf16) -> loss =
mse (normalised: the batch FVU) + aux_coef * aux -> backward -> remove the gradient parallel to
the decoder rows -> Adam -> decoder rows back to unit norm. Choices, after sparsify / OpenAI:
- lr defaults to 2e-4 / sqrt(n_latents / 2**14) (sparsify); Adam betas (0.9, 0.999), eps 1e-8.
- schedule: linear warmup over `warmup_steps`, constant, then linear decay to 0 over the last
  `decay_fraction` (20%) of the steps (OpenAI TopK paper).
- b_dec starts at the geometric median of a data sample (zero left half the latents dead here).
- W_enc starts as the transpose of the (unit-row) decoder times `encoder_init_norm` = 1/sqrt(3),
  the norm sparsify's encoder starts at (torch's default Linear init; it ties the decoder to it
  and normalises only the decoder). Against the plain transpose (norm 1), on SmolLM2 layer 15
  (8x, k 32, batch 4096): held-out FVU 0.373 vs 0.421 after 73 steps, 0.234 vs 0.255 after 292;
  0.3 gave 0.387 after 73.
- a latent is dead when it has not fired for `dead_window_tokens` tokens; AuxK trains those.
- data: `epochs` passes over the tokens, each in a fresh seeded permutation; the last partial
  batch of an epoch is dropped (batch rules need full batches).
Everything random derives from `cfg.seed`: the same cfg, data and seed give bit-identical weights
on CPU, and a run resumed from a checkpoint ends with the same weights as an uninterrupted one.

Data parallel (DDP): if torch.distributed is initialised, `batch_size` is the *global* batch.
Every rank holds the same x, draws the same seeded permutation and takes its contiguous shard
(batch_size / world_size tokens) of each global batch; the model is wrapped in DDP, which
averages the gradients. The batch-FVU losses are normalised by the *global* batch's variance
(two small all_reduces; a rank's own variance differs), scaled by world_size so that DDP's
average equals the one-process gradient; the same for the AuxK / Zipf auxiliary loss, whose
normaliser is the variance of the residual x - x_hat. Fire counts are summed over ranks, so the
dead-latent statistics (and the AuxK pool) are those of the global batch on every rank. b_dec's
init reads the same data sample on every rank (and DDP broadcasts rank 0's parameters at wrap
time); rank 0 writes the checkpoints. Token-wise rules (topk, gradient_topk) then train the same
SAE as one process given the same global batch, up to float summation order (tests/test_ddp.py).
Batch rules (mutual / feature choice) select within the rank's shard, which is not the global
batch rule, and their ThresholdEMA follows rank 0 (DDP broadcasts buffers before each forward).
The history's batch metrics (loss, fvu, mse, l0) are each rank's own shard's.
Launch one process per rank with torchrun, e.g. on one machine with 2 CPU processes:

    # train_ddp.py
    import torch, torch.distributed as dist
    from sae_repro.activations import ActivationSpec, collect
    from sae_repro.train import TrainConfig, train_sae
    dist.init_process_group("gloo")          # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    torch.set_num_threads(1)                 # cores / processes
    store = collect(ActivationSpec(n_tokens=1_000_000, with_loss=False))  # same store on every rank
    sae, history = train_sae(store, TrainConfig(k=32, batch_size=4096), checkpoint_dir="ckpt")
    if dist.get_rank() == 0:
        save(sae, "sae_out")              # sae_repro.saelens.save
    dist.destroy_process_group()

    torchrun --standalone --nproc_per_node 2 train_ddp.py
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from sae_repro.cache import atomic_path
from sae_repro.intervals import context_codes
from sae_repro.kernels import SparseCodes
from sae_repro.losses import aux_k_loss, aux_zipf_loss, mse
from sae_repro.metrics import dead_fraction, dense_fraction, feature_density, fvu, l0
from sae_repro.optim import Adam
from sae_repro.precision import resolve_bf16
from sae_repro.progress import Progress
from sae_repro.sae import BATCH_RULES, BUDGET_RULES, ForwardOutput, SAEConfig, SparseAutoencoder
from sae_repro.timing import timed

CHECKPOINT_FILE = "checkpoint.pt"
NEUTRAL_FIELDS = ("checkpoint_every", "log_every", "heldout_points")  # fields that do not change the weights


@dataclass
class TrainConfig:
    """Training hyper-parameters; the SAE's own fields (rule, k, beta, ...) are passed through."""

    k: int = 32
    n_latents: int | None = None  # None -> expansion * d_in
    expansion: int = 8
    rule: str = "topk"  # topk | mutual_choice | feature_choice | gradient_topk
    batch_size: int = 4096
    lr: float | None = None  # None -> 2e-4 / sqrt(n_latents / 2**14)
    warmup_steps: int | None = None  # None -> min(1000, total_steps // 20)
    decay_fraction: float = 0.2  # linear decay to 0 over this final share of the steps
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    aux: str | None = "auxk"  # "auxk" | "zipf" | None
    aux_coef: float = 1 / 32
    k_aux: int | None = None  # None -> d_in // 2
    dead_window_tokens: int = 1_000_000
    underused_fraction: float = 0.5  # aux="zipf": density below this share of the Zipf target
    beta: float = 0.0  # g-SAE
    m: int | None = None  # feature choice capacity (None -> k * batch_size / n_latents)
    capacity: str = "uniform"  # feature choice: "uniform" | "zipf"
    zipf_exponent: float = 1.0
    inference: str = "threshold"
    threshold_decay: float = 0.99
    b_dec_init: str = "geometric_median"  # | "mean" | "zero"
    encoder_init_norm: float = 3 ** -0.5  # W_enc starts as W_dec^T times this (see the module doc)
    bf16: bool | str = False  # bf16 autocast for the encoder matmul; "auto": where native (precision.py)
    device: str = "cpu"  # where the SAE trains; the activations stay in CPU memory, batches move
    sparse: bool = True  # sparse decoder and backward (False: dense autograd reference)
    seed: int = 0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    checkpoint_every: int | None = None  # steps; needs checkpoint_dir
    log_every: int = 10  # steps between history rows (each one syncs and computes metrics)
    heldout_points: int = 10  # with train_sae(heldout=...): held-out FVU at about this many rows
    # the budget ladder: shares of the steps at which a rung SAE branches off (see `train_sae`)
    ladder: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.rule not in BUDGET_RULES:
            raise ValueError(f"TrainConfig: rule={self.rule!r} cannot be trained here; "
                             f"allowed: {', '.join(BUDGET_RULES)}")
        if self.aux not in (None, "auxk", "zipf"):
            raise ValueError(f"TrainConfig: aux={self.aux!r}; allowed: 'auxk', 'zipf', None")
        for name in ("k", "expansion", "batch_size", "dead_window_tokens", "log_every", "heldout_points"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig: {name} must be a positive int, got {name}={v!r}")
        for name in ("n_latents", "max_steps", "checkpoint_every", "k_aux", "m"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"TrainConfig: {name} must be None or a positive int, got {name}={v!r}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"TrainConfig: warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"TrainConfig: decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ValueError(f"TrainConfig: epochs must be a finite number > 0, got {self.epochs}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig: lr must be None or a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.encoder_init_norm) and self.encoder_init_norm > 0):
            raise ValueError(f"TrainConfig: encoder_init_norm must be a finite number > 0, "
                             f"got {self.encoder_init_norm}")
        if self.b_dec_init not in ("geometric_median", "mean", "zero"):
            raise ValueError(f"TrainConfig: b_dec_init={self.b_dec_init!r}; "
                             f"allowed: 'geometric_median', 'mean', 'zero'")
        self.adam_betas = tuple(self.adam_betas)
        self.ladder = tuple(float(f) for f in self.ladder)
        if any(not 0 < f < 1 for f in self.ladder) or list(self.ladder) != sorted(set(self.ladder)):
            raise ValueError(f"TrainConfig: ladder must be increasing shares of the steps in (0, 1), "
                             f"got {self.ladder}")
        self.bf16 = resolve_bf16(self.bf16, self.device, "TrainConfig: bf16")  # the key holds the bool

    def resolved_n_latents(self, d_in: int) -> int:
        return self.n_latents if self.n_latents is not None else self.expansion * d_in

    def resolved_lr(self, n_latents: int) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(n_latents / 2**14)

    def sae_config(self, d_in: int, hook_name: str | None = None) -> SAEConfig:
        return SAEConfig(d_in=d_in, n_latents=self.resolved_n_latents(d_in), rule=self.rule, k=self.k,
                         m=self.m, capacity=self.capacity, zipf_exponent=self.zipf_exponent, beta=self.beta,
                         inference=self.inference, threshold_decay=self.threshold_decay, hook_name=hook_name)


def lr_factor(step: int, total: int, warmup: int, decay_fraction: float) -> float:
    """Multiplier of the base lr at `step`: linear warmup, constant, linear decay to 0 at the end."""
    up = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    decay_start = int(total * (1 - decay_fraction))
    down = min(1.0, (total - step) / max(1, total - decay_start)) if step >= decay_start else 1.0
    return up * down


# ----------------------------------------------------------------------------- one step


def _unwrap(model: torch.nn.Module) -> SparseAutoencoder:
    return model.module if isinstance(model, DDP) else model


def _global_sq_dev(t: Tensor) -> Tensor:
    """sum_i ||t_i - mean||^2 over the rows of all ranks (equal shards), mean the global row mean.

    t: [n_rank, d] -> scalar, the same on every rank; clamped at 1e-12 like `losses.mse`."""
    mean = t.sum(0, dtype=torch.float64)
    dist.all_reduce(mean)
    mean /= t.shape[0] * dist.get_world_size()
    dev = (t - mean.to(t.dtype)).pow(2).sum().detach()
    dist.all_reduce(dev)
    return dev.clamp_min(1e-12)


@torch.no_grad()
def set_decoder_norm_to_unit(sae: SparseAutoencoder) -> None:
    """Rescale each decoder row to unit norm (in place)."""
    sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def remove_parallel_decoder_grad(sae: SparseAutoencoder) -> None:
    """Project out of W_dec.grad its component along each decoder row (OpenAI TopK, sparsify):
    with unit rows kept by renormalising, that component only changes the norm, which the
    renormalisation undoes, so it would only add noise to Adam's moments."""
    if sae.W_dec.grad is None:
        return
    w, g = sae.W_dec, sae.W_dec.grad
    # row-wise dots as [L, 1, d] @ [L, d, 1]: no [L, d] temporaries (this runs every step)
    dots = torch.bmm(g.unsqueeze(1), w.unsqueeze(2)).squeeze(2)  # [L, 1]
    coef = dots / w.norm(dim=1, keepdim=True).square().clamp_min(1e-12)
    g.addcmul_(coef, w, value=-1.0)


@torch.no_grad()
def calibrate_threshold(sae: SparseAutoencoder, x: Tensor, batch_size: int, max_batches: int = 16) -> None:
    """Batch rules: re-learn the inference threshold with the final weights (others: nothing).

    The EMA kept during training lags weights that are still moving (in short runs the
    threshold-inference L0 was far from k). This resets it to the running mean, over up to
    `max_batches` full batches of x [n, d_in], of the smallest activation the batch rule selects
    (per latent for Feature Choice), so inference keeps about the training budget.
    """
    if sae.cfg.rule not in BATCH_RULES:
        return
    n = x.shape[0]
    if n < batch_size:
        raise ValueError(f"calibrate_threshold: need at least batch_size={batch_size} tokens, got {n}")
    was_training, decay = sae.training, sae.ema.decay
    sae.train()
    sae.ema.threshold.fill_(math.inf)
    sae.ema.seen.zero_()
    try:
        for i in range(min(max_batches, n // batch_size)):
            sae.ema.decay = i / (i + 1)  # EMA with this decay = running mean
            batch = x[i * batch_size:(i + 1) * batch_size].to(sae.W_enc.device).float()
            sae.encode_sparse(batch)  # a batch rule in training mode updates the EMA
    finally:
        sae.ema.decay = decay
        sae.train(was_training)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: Tensor, cfg: TrainConfig, *,
               grad: Tensor | None = None, dead_mask: Tensor | None = None,
               density: Tensor | None = None, validate: bool = True) -> dict[str, Any]:
    """One optimisation step on batch [n, d_in] (grad: its loss gradients for the g-SAE).

    model: a SparseAutoencoder or a DDP wrapper of one. dead_mask [L] bool feeds AuxK, density [L]
    the Zipf auxiliary loss. Returns detached tensors (no host sync): loss, recon, aux,
    fired [L] counts, and x_hat / codes for metrics. validate=False: batch already checked.
    """
    sae = _unwrap(model)
    world = dist.get_world_size() if isinstance(model, DDP) else 1
    opt.zero_grad(set_to_none=True)
    out = model(batch, grad, path="sparse" if cfg.sparse else "dense", bf16=cfg.bf16, validate=validate,
                reuse=cfg.sparse)  # the step's pre-activations are dead once it returns
    if world == 1:
        recon = mse(batch, out.x_hat)
    else:  # batch is this rank's shard: normalise by the global batch's variance (see module doc)
        recon = (batch - out.x_hat).pow(2).sum() * (world / _global_sq_dev(batch))
    aux = recon.new_zeros(())
    if cfg.aux == "auxk" and dead_mask is not None:
        aux = aux_k_loss(batch, out.x_hat, out.pre, dead_mask, sae.W_dec, cfg.k_aux, pre_pairs=out.pre_pairs,
                         autocast=cfg.bf16)
    elif cfg.aux == "zipf" and density is not None:
        aux = aux_zipf_loss(batch, out.x_hat, out.pre, density, sae.W_dec, cfg.k_aux, pre_pairs=out.pre_pairs,
                            autocast=cfg.bf16,
                            underused_fraction=cfg.underused_fraction, dead_mask=dead_mask)
    if world > 1 and cfg.aux is not None:
        # both aux losses are scale * |e - e_hat|^2 / sum|e - mean(e)|^2 over the rank's tokens,
        # e = x - x_hat detached: swap that normaliser for the global one (a constant factor)
        e = (batch - out.x_hat).detach()
        aux = aux * ((e - e.mean(0, keepdim=True)).pow(2).sum().clamp_min(1e-12) * world / _global_sq_dev(e))
    loss = recon + cfg.aux_coef * aux
    loss.backward()
    if sae.cfg.normalize_decoder:
        remove_parallel_decoder_grad(sae)
    opt.step()
    if sae.cfg.normalize_decoder:
        set_decoder_norm_to_unit(sae)
    codes = out.codes
    if isinstance(codes, SparseCodes):
        codes = SparseCodes(codes.vals.detach(), codes.idx, codes.bag, codes.offsets, codes.n_latents)
        fired = codes.fire_counts()
    else:
        codes = codes.detach()
        fired = (codes > 0).sum(0)
    return {"loss": loss.detach(), "recon": recon.detach(), "aux": aux.detach(), "fired": fired,
            "x_hat": out.x_hat.detach(), "codes": codes}


# ----------------------------------------------------------------------------- state


@dataclass
class _LatentStats:
    """Per-latent firing statistics: tokens since the last fire, and an EMA of the density."""

    since_fired: Tensor  # [L] long
    density_ema: Tensor  # [L] float64, bias-corrected by density_steps
    density_steps: int = 0

    @classmethod
    def zeros(cls, n_latents: int) -> "_LatentStats":
        return cls(torch.zeros(n_latents, dtype=torch.long), torch.zeros(n_latents, dtype=torch.float64))

    def update(self, fired: Tensor, n_tokens: int, window: int) -> None:
        self.since_fired = torch.where(fired > 0, 0, self.since_fired + n_tokens)
        decay = max(0.0, 1.0 - n_tokens / window)  # time constant ~ the dead window
        self.density_ema = decay * self.density_ema + (1 - decay) * fired.double() / n_tokens
        self.density_steps += 1

    def dead_mask(self, window: int) -> Tensor:
        return self.since_fired >= window

    def density(self, window: int, n_tokens: int) -> Tensor:
        decay = max(0.0, 1.0 - n_tokens / window)
        corr = 1.0 - decay**self.density_steps if self.density_steps else 1.0
        return (self.density_ema / max(corr, 1e-12)).float()


def _permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The token order of one epoch, a pure function of (seed, epoch) so a resumed run recomputes it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def _fingerprint(x: Tensor) -> list[float]:
    """A cheap identity of the training data, to refuse resuming on other data."""
    return [float(x.shape[0]), float(x.shape[1]), float(x[:64].double().sum()), float(x[-64:].double().sum())]


def _save_checkpoint(directory: Path, blob: dict[str, Any]) -> None:
    with atomic_path(directory / CHECKPOINT_FILE) as tmp:
        torch.save(blob, tmp)


def _load_checkpoint(directory: Path, cfg: TrainConfig, fingerprint: list[float]) -> dict[str, Any] | None:
    path = directory / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        blob = torch.load(path, weights_only=True)
    except Exception as e:  # a damaged checkpoint only costs the steps it saved
        warnings.warn(f"checkpoint {path} is unreadable ({type(e).__name__}); training from the start")
        path.unlink()
        return None
    want = {k: v for k, v in asdict(cfg).items() if k not in NEUTRAL_FIELDS}
    have = {k: v for k, v in blob["cfg"].items() if k not in NEUTRAL_FIELDS}
    have["adam_betas"] = tuple(have.get("adam_betas", ()))
    diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    if diff:
        raise ValueError(f"checkpoint {path} was written with another config (fields {diff}: "
                         f"{[(have.get(k), want.get(k)) for k in diff]}); use another checkpoint_dir or resume=False")
    if blob["fingerprint"] != fingerprint:
        raise ValueError(f"checkpoint {path} was written for other training data; "
                         f"use another checkpoint_dir or resume=False")
    return blob


def _restore(blob: dict[str, Any], sae: SparseAutoencoder,
             opt: torch.optim.Optimizer) -> tuple[_LatentStats, list[dict[str, float]], int]:
    """Load a checkpoint's model, optimizer and RNG state -> (stats, history, step); the learning
    rate is a function of the step."""
    sae.load_state_dict(blob["sae"])
    opt.load_state_dict(blob["opt"])
    torch.set_rng_state(blob["rng"])
    return _LatentStats(**blob["stats"]), blob["history"], blob["step"]


def _new_sae(x: Tensor, cfg: TrainConfig, hook: str | None, init: SparseAutoencoder | None) -> SparseAutoencoder:
    """A fresh SAE (b_dec from a data sample) or one holding `init`'s weights."""
    n, d = x.shape
    sae = SparseAutoencoder(cfg.sae_config(d, hook), seed=cfg.seed)
    if init is None:
        sae.init_b_dec(x[_permutation(n, cfg.seed, 0)[:16384]].float(), cfg.b_dec_init)
        with torch.no_grad():
            sae.W_enc.mul_(cfg.encoder_init_norm)
        return sae
    if (init.cfg.d_in, init.cfg.n_latents) != (d, sae.cfg.n_latents):
        raise ValueError(f"init has d_in={init.cfg.d_in}, n_latents={init.cfg.n_latents}; "
                         f"cfg and data need d_in={d}, n_latents={sae.cfg.n_latents}")
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(getattr(init, name))
    return sae


def _check_same_on_ranks(values: list[float]) -> None:
    """Refuse to train if the ranks disagree on the data (fingerprint) or the resumed step."""
    mine = torch.tensor(values, dtype=torch.float64)
    first = mine.clone()
    dist.broadcast(first, 0)
    ok = torch.tensor([int(torch.equal(mine, first))])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not ok.item():
        raise ValueError(f"data parallel: the ranks differ in their data or resumed step (rank 0: "
                         f"{first.tolist()}, rank {dist.get_rank()}: {values}); every rank needs the same x "
                         f"and the same checkpoint_dir contents")


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ----------------------------------------------------------------------------- data


def _check_data(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or x.ndim != 2 or not x.is_floating_point():
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating tensor [n_tokens, d_in], got {got}")
    for chunk in x.split(1 << 16):  # chunked: a bool copy of 1M x d would cost d MB
        if not bool(torch.isfinite(chunk).all()):
            raise ValueError(f"{name} contains NaN or inf values; only finite values are allowed")


def _resolve_data(x: Any, hook: str | None, grads: Tensor | None,
                  cfg: TrainConfig) -> tuple[Tensor, Tensor | None, str | None]:
    """Tensor or ActivationStore(+hook) -> (x [n, d], grads [n, d] | None, hook)."""
    if not isinstance(x, Tensor):
        if not hasattr(x, "load") or not hasattr(x, "spec"):
            raise ValueError(f"x must be a Tensor [n_tokens, d_in] or an ActivationStore, got {type(x).__name__}")
        hooks = x.spec.hooks
        if hook is None and len(hooks) != 1:
            raise ValueError(f"hook=None but the store has hooks {list(hooks)}: name one")
        hook = hook or hooks[0]
        if hook not in hooks:
            raise ValueError(f"hook={hook!r} is not in the store; it has {list(hooks)}")
        store, x = x, x.load(hook)
        if grads is None and cfg.rule == "gradient_topk" and cfg.beta > 0:
            if f"grad/{hook}" not in store.manifest["tensors"]:
                raise ValueError(f"rule='gradient_topk' needs gradients; the store has none for {hook!r} "
                                 f"(collect it with ActivationSpec(with_grad=True))")
            grads = store.load(f"grad/{hook}")
    _check_data(x, "x")
    if grads is not None:
        _check_data(grads, "grads")
        if grads.shape != x.shape:
            raise ValueError(f"grads must have x's shape {tuple(x.shape)}, got {tuple(grads.shape)}")
    elif cfg.rule == "gradient_topk" and cfg.beta > 0:
        raise ValueError("rule='gradient_topk' with beta > 0 needs grads [n_tokens, d_in] (the loss gradients)")
    return x, grads, hook


# ----------------------------------------------------------------------------- the loop


@dataclass
class _Run:
    """What the step loop carries: the SAE (and its DDP wrapper), optimizer, firing statistics,
    history, the step reached, and the schedule's length (a rung's is shorter than the run's)."""

    model: torch.nn.Module
    sae: SparseAutoencoder
    opt: torch.optim.Optimizer
    stats: _LatentStats
    history: list[dict[str, float]]
    step: int
    total: int


@dataclass(frozen=True)
class _Data:
    """What the step loop reads: x [n, d], grads [n, d] or None, heldout [m, d] or None (a
    rung is not evaluated on the way), and the schedule's epoch length and warmup."""

    x: Tensor
    grads: Tensor | None
    heldout: Tensor | None
    steps_per_epoch: int
    warmup: int


def _rung_plan(cfg: TrainConfig, total: int) -> list[tuple[int, int]]:
    """(branch step, rung steps) per share of `cfg.ladder`: a rung of s steps follows the run up
    to the start of its own decay, s * (1 - decay_fraction), then decays to 0 at step s."""
    plan = []
    for f in cfg.ladder:
        steps = max(1, round(f * total))
        if steps < total and all(steps != s for _, s in plan):
            plan.append((int(steps * (1 - cfg.decay_fraction)), steps))
    return plan


@timed("training")
def train_sae(x: Tensor | Any, cfg: TrainConfig, *, hook: str | None = None, grads: Tensor | None = None,
              init: SparseAutoencoder | None = None, checkpoint_dir: str | Path | None = None,
              resume: bool = True, progress: bool = True, heldout: Tensor | None = None,
              on_rung: Callable[[SparseAutoencoder, dict[str, Any]], None] | None = None,
              ) -> tuple[SparseAutoencoder, list[dict[str, float]]]:
    """Train an SAE on x [n_tokens, d_in] (or an ActivationStore and its `hook`).

    grads: [n_tokens, d_in] loss gradients at x (g-SAE; read from the store if not given).
    init: start from this SAE's weights instead of a fresh init (fine-tuning, e.g. Feature
    Choice from a Mutual Choice SAE as in Ayonrinde 2024); its rule may differ from cfg.rule.
    checkpoint_dir: where `checkpoint.pt` is written every `cfg.checkpoint_every` steps
    (atomically) and, with resume=True, read back to continue a killed run.
    Returns the SAE (eval mode, ready for inference: a batch rule's threshold is calibrated with
    the final weights, `calibrate_threshold`) and the history: one dict per `log_every` steps with
    step, tokens, lr, loss, fvu, mse, l0, dead_fraction, aux, tokens_per_s. A non-finite loss
    stops training with a FloatingPointError naming the step.
    heldout: activations [n, d_in] the SAE never trains on (no gradient-guided rule: it selects
    without a gradient there); about `cfg.heldout_points` history rows, the last one included,
    then also carry `heldout_fvu` (NaN in the others), the curve `plateau` reads. Evaluating
    changes nothing in training (same weights with and without it).

    The budget ladder (`cfg.ladder`, shares f of the steps): for each f, a rung SAE of s = f *
    steps steps, the SAE a run of s steps would have ended with (warmup-stable-decay: the
    learning rate is constant after warmup until a run's last `decay_fraction`, so a run of s
    steps is this run's prefix up to s * (1 - decay_fraction), then its own decay). The branch
    is a copy of the SAE, optimizer and firing statistics at that step, trained on the same
    batches with the shorter schedule (the same warmup); it costs decay_fraction * s extra steps
    and leaves the main run unchanged. Each finished rung is handed to on_rung(sae, row): row is
    its last history row (with heldout_fvu if `heldout`) plus `rung_share`. A resumed run skips
    the rungs that branched before its checkpoint (on_rung had them). Not with data parallel.
    """
    x, grads, hook = _resolve_data(x, hook, grads, cfg)
    n, d = x.shape
    if heldout is not None:
        _check_data(heldout, "heldout")
        if heldout.shape[1] != d:
            raise ValueError(f"heldout must be [n_tokens, d_in={d}], got {tuple(heldout.shape)}")
    rank, world = _dist_info()
    B = cfg.batch_size
    if B > n:
        raise ValueError(f"batch_size={B} is larger than the number of tokens n={n}")
    if B % world:
        raise ValueError(f"batch_size={B} must be divisible by the number of ranks {world}")
    if cfg.ladder and (world > 1 or on_rung is None):
        raise ValueError(f"cfg.ladder={cfg.ladder} needs on_rung= (where the rung SAEs go) and one process")
    steps_per_epoch = n // B
    total = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(1000, total // 20)
    rungs = _rung_plan(cfg, total)

    dev = torch.device(cfg.device)
    sae = _new_sae(x, cfg, hook, init).to(dev)
    L = sae.cfg.n_latents
    opt = Adam(sae.parameters(), lr=cfg.resolved_lr(L), betas=cfg.adam_betas, eps=cfg.adam_eps)
    stats, history, step = _LatentStats.zeros(L), [], 0
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    fingerprint = _fingerprint(x)
    blob = _load_checkpoint(directory, cfg, fingerprint) if directory is not None and resume else None
    if blob is not None:
        stats, history, step = _restore(blob, sae, opt)
    if world > 1:
        _check_same_on_ranks(fingerprint + [float(step)])

    run = _Run(DDP(sae) if world > 1 else sae, sae, opt, stats, history, step, total)
    data = _Data(x, grads, heldout, steps_per_epoch, warmup)
    bar = tqdm(total=total, initial=step, desc=f"SAE {sae.cfg.rule} k={cfg.k} L={L}",
               disable=not progress or rank != 0)
    report = Progress(f"train SAE {sae.cfg.rule} k={cfg.k} latents={L}: step", total)

    def after_step(r: _Run) -> None:
        if r.history and r.history[-1]["step"] == r.step:
            row = r.history[-1]
            bar.set_postfix(fvu=f"{row['fvu']:.4f}", l0=f"{row['l0']:.1f}", dead=f"{row['dead_fraction']:.3f}")
        bar.update(1)
        report.update(r.step)
        if directory is not None and cfg.checkpoint_every and r.step % cfg.checkpoint_every == 0 and rank == 0:
            _save_checkpoint(directory, {
                "format": 2, "cfg": asdict(cfg), "fingerprint": fingerprint, "step": r.step,
                "sae": sae.state_dict(), "opt": opt.state_dict(), "stats": asdict(r.stats),
                "history": r.history, "rng": torch.get_rng_state()})

    for branch, steps in rungs:
        if branch < run.step:
            continue  # branched before the checkpoint this run resumed from
        _train_until(run, branch, cfg, data, after_step)
        copied = copy.deepcopy(run.sae)
        rung = _Run(copied, copied, _copy_opt(run.opt, copied, cfg), copy.deepcopy(run.stats), [], run.step, steps)
        _train_until(rung, steps, cfg, replace(data, heldout=None), lambda r: None)
        row = _finish(rung, x, B, heldout)
        on_rung(rung.sae, row | {"rung_share": steps / total})
    _train_until(run, total, cfg, data, after_step)
    bar.close()
    if world > 1:  # DDP broadcasts buffers from rank 0 before each forward: end on rank 0's too
        for buf in sae.buffers():
            dist.broadcast(buf, 0)
    _finish(run, x, B, None)
    return sae.eval(), run.history


def _copy_opt(opt: torch.optim.Optimizer, sae: SparseAutoencoder, cfg: TrainConfig) -> torch.optim.Optimizer:
    """An optimizer of `sae` (a copy of the SAE `opt` steps) with a copy of `opt`'s state
    (load_state_dict alone would share the moment tensors)."""
    new = Adam(sae.parameters(), lr=opt.param_groups[0]["lr"], betas=cfg.adam_betas, eps=cfg.adam_eps)
    new.load_state_dict(copy.deepcopy(opt.state_dict()))
    return new


def _train_until(run: _Run, stop: int, cfg: TrainConfig, data: _Data, after_step: Callable[[_Run], None]) -> None:
    """Train `run` to step `stop` on the learning-rate schedule of its `total` steps."""
    x, grads, heldout, steps_per_epoch, warmup = data.x, data.grads, data.heldout, data.steps_per_epoch, data.warmup
    n, B = x.shape[0], cfg.batch_size
    rank, world = _dist_info()
    dev = torch.device(cfg.device)
    base_lr = cfg.resolved_lr(run.sae.cfg.n_latents)
    every = cfg.log_every * max(1, round(run.total / cfg.heldout_points / cfg.log_every))  # held-out rows
    run.sae.train()
    perm, perm_epoch, t_last, step_last = None, -1, time.perf_counter(), run.step
    while run.step < stop:
        epoch, pos = divmod(run.step, steps_per_epoch)
        if epoch != perm_epoch:
            perm, perm_epoch = _permutation(n, cfg.seed, epoch), epoch
        idx = perm[pos * B:(pos + 1) * B][rank * B // world:(rank + 1) * B // world]  # contiguous shard
        batch = x[idx].to(dev).float()
        for group in run.opt.param_groups:
            group["lr"] = base_lr * lr_factor(run.step, run.total, warmup, cfg.decay_fraction)
        density = run.stats.density(cfg.dead_window_tokens, B).to(dev) if cfg.aux == "zipf" else None
        out = train_step(run.model, run.opt, batch, cfg,
                         grad=grads[idx].to(dev).float() if grads is not None else None,
                         dead_mask=run.stats.dead_mask(cfg.dead_window_tokens).to(dev), density=density,
                         validate=False)  # _resolve_data checked all of x and grads
        if dev.type == "cpu" or (run.step + 1) % cfg.log_every == 0:  # a sync: on a GPU only when logging
            _check_finite(out["loss"], run.step + 1, x, cfg)
        fired = out["fired"]
        if world > 1:
            dist.all_reduce(fired)
        run.stats.update(fired.cpu(), B, cfg.dead_window_tokens)
        run.step += 1
        if run.step % cfg.log_every == 0 or run.step == run.total:
            now = time.perf_counter()
            row = _log_row(run.step, B, run.opt, out, batch, run.stats, cfg,
                           (run.step - step_last) * B / (now - t_last))
            if heldout is not None:
                row["heldout_fvu"] = (heldout_fvu(run.sae, heldout, B)
                                      if run.step % every == 0 or run.step == run.total else math.nan)
            t_last, step_last = time.perf_counter(), run.step  # the held-out pass is not training time
            run.history.append(row)
        after_step(run)


def _finish(run: _Run, x: Tensor, batch_size: int, heldout: Tensor | None) -> dict[str, Any]:
    """End a run: free the step's workspace, calibrate a batch rule's inference threshold, eval
    mode -> its last history row (with the held-out FVU if `heldout`)."""
    run.sae._pre_buffer = None  # the step's workspace (encode_sparse(reuse=True))
    calibrate_threshold(run.sae, x, batch_size)  # batch rules: infer at the training budget
    run.sae.eval()
    row = dict(run.history[-1]) if run.history else {"step": run.step}
    if heldout is not None and not math.isfinite(row.get("heldout_fvu", math.nan)):
        row["heldout_fvu"] = heldout_fvu(run.sae, heldout, batch_size)
    return row


def _check_finite(loss: Tensor, step: int, x: Tensor, cfg: TrainConfig) -> None:
    """Stop with an error naming the step when the loss is NaN or inf (training cannot recover)."""
    if not bool(torch.isfinite(loss)):
        scale = max(float(c.abs().max()) for c in x.split(1 << 16))
        raise FloatingPointError(
            f"training stopped at step {step}: the loss is {float(loss)}. The activations reach "
            f"|x| = {scale:.3g}; scale them down (an SAE expects activations of order 1..1e3) or lower "
            f"the learning rate (lr={cfg.lr}); checkpoints written before this step are kept")


def _log_row(step: int, B: int, opt: torch.optim.Optimizer, out: dict[str, Any], batch: Tensor,
             stats: _LatentStats, cfg: TrainConfig, tokens_per_s: float) -> dict[str, float]:
    codes = out["codes"]
    dense = codes.to_dense() if isinstance(codes, SparseCodes) else codes
    # "dead" = no fire within the window: since_fired < window marks a (>= 1) fire in it
    return {"step": step, "tokens": step * B, "lr": opt.param_groups[0]["lr"],
            "loss": float(out["loss"]), "fvu": fvu(batch, out["x_hat"]),
            "mse": float(mse(batch, out["x_hat"], normalize=False)), "l0": l0(dense),
            "dead_fraction": dead_fraction((stats.since_fired < cfg.dead_window_tokens).long()),
            "aux": float(out["aux"]), "tokens_per_s": tokens_per_s}


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def heldout_fvu(sae: SparseAutoencoder, x: Tensor, batch_size: int) -> float:
    """FVU on x [n, d_in] in eval mode, in batches of `batch_size`. Batch rules select within
    each batch (their threshold is only calibrated at the end of training); nothing of the SAE
    changes (`reconstruct` restores the mode, and the config is restored here)."""
    cfg = sae.cfg
    if cfg.rule in BATCH_RULES:
        sae.cfg = replace(cfg, inference="batch")
    try:
        x_hat, _ = reconstruct(sae, x, batch_size=batch_size)
    finally:
        sae.cfg = cfg
    return fvu(x.float(), x_hat)


def training_summary(history: list[dict[str, float]] | Any, n_tokens: int, batch_size: int) -> dict[str, Any]:
    """What a figure's CSV says about how an SAE was trained: steps, tokens seen, distinct
    training tokens, epochs, and `plateau`'s held-out FVU, tail gain and plateau status."""
    p = plateau(history)
    seen = p["steps"] * batch_size
    return {"train_steps": p["steps"], "train_tokens_seen": seen, "train_distinct_tokens": n_tokens,
            "train_epochs": seen / n_tokens if n_tokens else math.nan,
            "heldout_fvu": p["heldout_fvu"], "heldout_tail_gain": p["gain"], "plateaued": p["plateaued"]}


PLATEAU_TAIL = 0.2  # the last share of the steps a plateau is judged over
PLATEAU_GAIN = 0.01  # relative improvement of the held-out FVU below this over the tail: a plateau


def plateau(history: list[dict[str, float]] | Any) -> dict[str, Any]:
    """Has training converged? From the `heldout_fvu` rows of a history (list of dicts or a
    DataFrame): the held-out FVU at the row nearest to (1 - PLATEAU_TAIL) of the steps against
    the last one. -> dict(steps, heldout_fvu (last), gain (relative improvement over the tail),
    plateaued (gain < PLATEAU_GAIN)); NaN gain and plateaued False without held-out rows."""
    rows = history.to_dict("records") if hasattr(history, "to_dict") else list(history)
    pts = [(r["step"], r["heldout_fvu"]) for r in rows
           if isinstance(r.get("heldout_fvu"), float) and math.isfinite(r["heldout_fvu"])]
    steps = int(rows[-1]["step"]) if rows else 0
    if len(pts) < 2:
        return {"steps": steps, "heldout_fvu": pts[-1][1] if pts else math.nan, "gain": math.nan,
                "plateaued": False}
    start = min(pts[:-1], key=lambda p: abs(p[0] - (1 - PLATEAU_TAIL) * steps))[1]
    end = pts[-1][1]
    gain = (start - end) / start if start > 0 else math.nan
    return {"steps": steps, "heldout_fvu": end, "gain": gain, "plateaued": bool(gain < PLATEAU_GAIN)}


def _eval_batches(sae: SparseAutoencoder, x: Tensor, grads: Tensor | None,
                  batch_size: int) -> Iterator[tuple[Tensor, ForwardOutput]]:
    """(x batch [b, d_in] on the SAE's device, its sparse forward) over x, in eval mode."""
    _check_data(x, "x")
    if grads is not None and grads.shape != x.shape:
        raise ValueError(f"grads must have x's shape {tuple(x.shape)}, got {tuple(grads.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    was_training, dev = sae.training, sae.W_dec.device
    sae.eval()
    try:
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size].to(dev).float()
            gb = grads[i:i + batch_size].to(dev).float() if grads is not None else None
            yield xb, sae.forward_sparse(xb, gb)
    finally:
        sae.train(was_training)


@torch.no_grad()
def reconstruct(sae: SparseAutoencoder, x: Tensor, grads: Tensor | None = None, *,
                batch_size: int = 4096) -> tuple[Tensor, Tensor]:
    """Sae(x) in eval mode, in token batches (the SAE stays on its device, results on CPU).

    x: [n, d_in] (grads: its loss gradients, for a g-SAE to select with) -> (x_hat [n, d_in]
    float32, l0 [n] long: the latents active (non-zero) on each token). Batch rules use their
    `cfg.inference` mode; with "batch" they select within each batch of `batch_size` tokens.
    """
    x_hats, l0s = [], []
    for _, out in _eval_batches(sae, x, grads, batch_size):
        x_hats.append(out.x_hat.float().cpu())
        l0s.append(out.codes.active_per_token().cpu())
    return torch.cat(x_hats), torch.cat(l0s)


@torch.no_grad()
def evaluate(sae: SparseAutoencoder, x: Tensor, grads: Tensor | None = None, *,
             batch_size: int = 4096, context: Tensor | None = None) -> dict[str, Any]:
    """Metrics of `sae` on x [n, d_in] in eval mode (batch rules use their learned threshold).

    -> dict(fvu, mse, l0, dead_fraction (never fired on these n tokens), dense_fraction,
    n_tokens, density [n_latents], x_hat [n, d_in] (float32, CPU), l0_per_token [n]), the
    metrics all through `metrics`. Batches of `batch_size` tokens, as in `reconstruct`.
    context: [n] each token's context; then also firings_per_context [n_contexts, n_latents]
    (float64 fire counts, the contexts numbered in order of first appearance, as
    `intervals.per_context`) and tokens_per_context [n_contexts]: what a bootstrap of the
    densities over contexts resamples (`zipf.zipf_bootstrap`).
    """
    codes = None
    if context is not None:
        context = torch.as_tensor(context).reshape(-1)
        if len(context) != x.shape[0]:
            raise ValueError(f"evaluate: context has {len(context)} tokens, x has {x.shape[0]}")
        codes, n_contexts = context_codes(context.numpy())
        codes = torch.from_numpy(codes)
        # counts on the SAE's device (exact in float32 up to 2^24 tokens per context)
        per_ctx = torch.zeros(n_contexts, sae.cfg.n_latents, device=sae.W_dec.device)
    x_hats, l0s, counts, l0_sum = [], [], torch.zeros(sae.cfg.n_latents, dtype=torch.float64), 0.0
    i = 0
    for xb, out in _eval_batches(sae, x, grads, batch_size):
        dense = out.codes.to_dense()
        x_hats.append(out.x_hat.float().cpu())
        counts += feature_density(dense).cpu() * len(xb)  # per-latent fire counts on this batch
        l0_sum += l0(dense) * len(xb)
        l0s.append(out.codes.active_per_token().cpu())
        if codes is not None:
            per_ctx.index_add_(0, codes[i:i + len(xb)].to(per_ctx.device), (dense != 0).float())
        i += len(xb)
    x_hat = torch.cat(x_hats)
    n = x.shape[0]
    density = counts / n
    out = {"fvu": fvu(x.float(), x_hat), "mse": float(mse(x.float(), x_hat, normalize=False)),
           "l0": l0_sum / n, "dead_fraction": dead_fraction(counts.round().long()),
           "dense_fraction": dense_fraction(density), "n_tokens": n, "density": density,
           "x_hat": x_hat, "l0_per_token": torch.cat(l0s)}
    if codes is not None:
        out["firings_per_context"] = per_ctx.double().cpu().numpy()
        out["tokens_per_context"] = np.bincount(codes.numpy(), minlength=len(per_ctx)).astype(np.float64)
    return out
