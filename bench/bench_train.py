"""Benchmark: training a TopK SAE, ours (`sae_repro.train`) against SAELens' `SAETrainer` and
EleutherAI's sparsify (`eai-sparsify`, `pip install -c constraints.txt -e .[bench]`).

One process, identical activations (the default model's layer-15 residual stream, bf16 store),
the same token order (our seeded permutation, fed to each peer batch by batch), the same
number of tokens, lr, Adam betas and schedule (warmup 5%, linear decay to 0 over the last 20%).
What the libraries do differently and keep: SAELens clips the gradient norm to 1, starts b_dec at
0 and the decoder rows at norm 0.1, rescales the TopK by the decoder norms, and uses an
unnormalised MSE; sparsify starts b_dec at the batch mean and steps torch's default (foreach)
Adam, as its Trainer does; we start b_dec at the geometric median. Ours and sparsify keep unit
decoder rows and normalise the MSE by the batch variance. All have AuxK on (no latent dies
within a few hundred k tokens). sparsify's Trainer computes activations from a HF model on the
fly, so its training step is driven here the way `sparsify/trainer.py` (1.3.3) `fit()` does it.

Printed, per variant: tokens/s of whole training runs (best and median over --repeats runs,
variants alternating), FVU and L0 on held-out activations (split="test"; `sae_repro.metrics.fvu`
for all), peak RSS and its rise during the run; the ratios ours / sparsify and ours / SAELens.
Then, at each of --step-batches (1024, 4096), one training step of ours (TopK, Mutual Choice,
Feature Choice) and of sparsify against the encoder's dense [B, d] x [d, n] matmul, steps and
matmuls timed alternating call by call; and a torch.profiler table of our TopK step (which ops
take the time).

    .venv/bin/python bench/bench_train.py                           # 300k tokens, smollm2-135m
    .venv/bin/python bench/bench_train.py --model tiny-random --n-tokens 40000 --repeats 1   # smoke

The first run collects the activations (the model forward, minutes); later runs read the cache.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import threading
import time
from typing import Any, Callable, Iterator

import torch

from sae_repro.activations import ActivationSpec, collect
from sae_repro.metrics import fvu
from sae_repro.optim import Adam
from sae_repro.precision import native_bf16
from sae_repro.train import TrainConfig, _permutation, evaluate, lr_factor, train_sae, train_step

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


class PeakRSS:
    """Peak resident memory while the block runs (sampled every 10 ms in a thread), and its rise
    over the RSS at the start; freed heap memory is handed back to the OS first (malloc_trim), so
    a run does not reuse what an earlier one left and the rise is this run's own working memory."""

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.start = self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def stats(xs: list[float]) -> str:
    return f"best {max(xs):8.0f}  median {statistics.median(xs):8.0f}"


# ----------------------------------------------------------------------------- matmul peak


def matmul_runners(B: int, d: int, n: int, precisions: tuple[str, ...]) -> dict[str, Callable[[], None]]:
    """Dense [B, d] x [d, n] products in each of `precisions` (bf16, fp32): `a @ b` (a fresh
    [B, n] output each call, as in a training step) and `mm(out=)` into a reused buffer (the
    kernel alone, no page faults)."""
    g = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(B, d, generator=g), torch.randn(d, n, generator=g)
    out: dict[str, Callable[[], None]] = {}
    pairs = {"bf16": (a32.bfloat16(), b32.bfloat16()), "fp32": (a32, b32)}
    for name, (a, b) in ((p, pairs[p]) for p in precisions):
        buf = torch.empty(B, n, dtype=a.dtype)
        out[f"matmul {name}"] = lambda a=a, b=b: a @ b
        out[f"matmul {name} out="] = lambda a=a, b=b, buf=buf: torch.mm(a, b, out=buf)
    return out


def interleaved(fns: dict[str, Callable[[], None]], rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each fn, the fns alternating call by call (so load changes hit all)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t0)
    return ts


# ----------------------------------------------------------------------------- the two trainers


def our_cfg(args, rule: str, bf16: bool) -> TrainConfig:
    return TrainConfig(k=args.k, expansion=args.expansion, rule=rule, batch_size=args.batch_size,
                       epochs=args.epochs, bf16=bf16, aux="auxk", seed=0, log_every=10**9)


def run_ours(x: torch.Tensor, cfg: TrainConfig) -> tuple[Any, float]:
    t0 = time.perf_counter()
    sae, _ = train_sae(x, cfg, progress=False)
    return sae, time.perf_counter() - t0


def batches(x: torch.Tensor, B: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Our token order (`train._permutation` per epoch, last partial batch dropped), fp32 batches."""
    n, step, perm = x.shape[0], 0, None
    while True:
        epoch, pos = divmod(step, n // B)
        if pos == 0:
            perm = _permutation(n, seed, epoch)
        yield x[perm[pos * B:(pos + 1) * B]].float()
        step += 1


def run_sae_lens(x: torch.Tensor, args, cfg: TrainConfig, autocast: bool) -> tuple[Any, float]:
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    n, d = x.shape
    B = args.batch_size
    total = max(1, int(cfg.epochs * (n // B)))
    warmup = min(1000, total // 20)
    decay = total - int(total * (1 - cfg.decay_fraction))
    lr = cfg.resolved_lr(cfg.resolved_n_latents(d))
    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=cfg.resolved_n_latents(d), k=args.k,
                                                dtype="float32", device="cpu"))
    tcfg = SAETrainerConfig(total_training_samples=total * B, train_batch_size_samples=B, lr=lr, lr_end=lr,
                            lr_scheduler_name="constant", lr_warm_up_steps=warmup, lr_decay_steps=decay,
                            adam_beta1=cfg.adam_betas[0], adam_beta2=cfg.adam_betas[1], device="cpu",
                            autocast=autocast)
    trainer = SAETrainer(tcfg, sae, batches(x, B))
    t0 = time.perf_counter()
    trainer.fit()
    return sae, time.perf_counter() - t0


def sparsify_step(d: int, args, cfg: TrainConfig, total: int, bf16: bool) -> tuple[Any, Callable[[torch.Tensor], None]]:
    """sparsify's SAE and one step of its Trainer.fit() on a batch: unit decoder rows, forward
    (fused encoder + embedding_bag decoder, FVU and AuxK losses), backward, the decoder-parallel
    gradient removed, torch Adam (default, as its Trainer builds it), zero_grad, lr schedule
    (ours, for the same lr each step). b_dec is set to the first batch's mean, as fit() does."""
    from sparsify import SparseCoder, SparseCoderConfig

    L = cfg.resolved_n_latents(d)
    torch.manual_seed(0)
    sae = SparseCoder(d, SparseCoderConfig(num_latents=L, k=args.k), device="cpu", dtype=torch.float32)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.resolved_lr(L), betas=cfg.adam_betas)
    warmup = min(1000, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, cfg.decay_fraction))
    since_fired = torch.zeros(L, dtype=torch.long)
    state = {"step": 0}

    def step(xb: torch.Tensor) -> None:
        if state["step"] == 0:
            sae.b_dec.data = xb.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        dead = since_fired > cfg.dead_window_tokens
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = sae(xb, dead_mask=dead)
        (out.fvu + cfg.aux_coef * out.auxk_loss).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sched.step()
        with torch.no_grad():
            fired = torch.zeros(L, dtype=torch.bool)
            fired[out.latent_indices.flatten()] = True
            since_fired.add_(len(xb)).masked_fill_(fired, 0)
        state["step"] += 1

    return sae, step


def run_sparsify(x: torch.Tensor, args, cfg: TrainConfig, bf16: bool) -> tuple[Any, float]:
    n, d = x.shape
    total = max(1, int(cfg.epochs * (n // args.batch_size)))
    sae, step = sparsify_step(d, args, cfg, total, bf16)
    data = batches(x, args.batch_size)
    t0 = time.perf_counter()
    for _ in range(total):
        step(next(data))
    sae.set_decoder_norm_to_unit_norm()
    return sae, time.perf_counter() - t0


@torch.no_grad()
def heldout_sparsify(sae, x: torch.Tensor, B: int = 4096) -> dict[str, float]:
    x_hats = [sae(x[i:i + B].float()).sae_out for i in range(0, len(x), B)]
    return {"fvu": fvu(x.float(), torch.cat(x_hats)), "l0": float(sae.cfg.k)}


@torch.no_grad()
def heldout_sae_lens(sae, x: torch.Tensor, B: int = 4096) -> dict[str, float]:
    sae.eval()
    x_hats, l0_sum = [], 0.0
    for i in range(0, len(x), B):
        xb = x[i:i + B].float()
        acts = sae.encode(xb)
        x_hats.append(sae.decode(acts))
        l0_sum += float((acts != 0).sum())
    return {"fvu": fvu(x.float(), torch.cat(x_hats)), "l0": l0_sum / len(x)}


# ----------------------------------------------------------------------------- our step, closer


def step_runner(x: torch.Tensor, cfg: TrainConfig, dead_fraction: float = 0.0) -> Callable[[], None]:
    """A closure running one `train_step` of a fresh SAE on the next batch (no gather, no logging).
    dead_fraction: that share of the latents (seeded at random) counts as dead, so AuxK trains
    them (wide SAEs trained for thousands of steps here had up to ~37% dead)."""
    from sae_repro.sae import SparseAutoencoder

    sae = SparseAutoencoder(cfg.sae_config(x.shape[1]), seed=0)
    sae.init_b_dec(x[:16384].float())
    opt = Adam(sae.parameters(), lr=cfg.resolved_lr(sae.cfg.n_latents))
    g = torch.Generator().manual_seed(0)
    dead = torch.rand(sae.cfg.n_latents, generator=g) < dead_fraction  # AuxK on, these latents dead
    batch = cycled_batches(x, cfg.batch_size)
    return lambda: train_step(sae, opt, batch(), cfg, dead_mask=dead, validate=False)


def cycled_batches(x: torch.Tensor, B: int) -> Callable[[], torch.Tensor]:
    """The next of x's first (up to) 8 batches of B tokens, fp32, round and round."""
    xb = [x[i * B:(i + 1) * B].float() for i in range(min(8, max(1, len(x) // B)))]
    count = iter(range(10**9))
    return lambda: xb[next(count) % len(xb)]


def sparsify_step_runner(x: torch.Tensor, args, cfg: TrainConfig, bf16: bool) -> Callable[[], None]:
    """The same for sparsify's step (on the same 8 batches)."""
    _, step = sparsify_step(x.shape[1], args, cfg, 10**6, bf16)
    batch = cycled_batches(x, args.batch_size)
    return lambda: step(batch())


def step_table(x: torch.Tensor, args, B: int, precisions: tuple[str, ...]) -> None:
    """Seconds per step of ours (every rule) and sparsify against the encoder's dense
    [B, d] x [d, n] matmul, all timed call by call alternating. The target is set against the
    matmul kernel alone (`mm(out=)`, the way our step calls it); `a @ b` (a fresh output, the
    way a plain addmm gets it) is printed beside it."""
    d, L = x.shape[1], args.expansion * x.shape[1]
    step_args = argparse.Namespace(**{**vars(args), "batch_size": B})
    fns = matmul_runners(B, d, L, precisions)
    for p in precisions:
        for rule in ("topk", "mutual_choice", "feature_choice"):
            fns[f"ours {rule} {p}"] = step_runner(x, our_cfg(step_args, rule, p == "bf16"), args.dead_fraction)
        if not args.no_sparsify:
            fns[f"sparsify topk {p}"] = sparsify_step_runner(x, step_args, our_cfg(step_args, "topk", False),
                                                             p == "bf16")
    ts = interleaved(fns, args.step_rounds)
    best = {k: min(v) for k, v in ts.items()}
    med = {k: statistics.median(v) for k, v in ts.items()}
    print(f"\nsteps at batch {B} (d {d}, {L} latents, k {args.k}; {args.step_rounds} rounds, alternating; "
          f"ours with {args.dead_fraction:.0%} of the latents dead, sparsify with none):")
    for p in precisions:
        mm = f"matmul {p} out="
        for name in ts:
            if name.endswith(p) or name.endswith(f"{p} out="):
                print(f"  {name:26s} {best[name] * 1e3:7.1f} ms best {med[name] * 1e3:7.1f} ms median  = "
                      f"{best[name] / best[mm]:5.2f}x / {med[name] / med[mm]:5.2f}x the matmul (out=)")
        top = f"ours topk {p}"
        print(f"  ours topk {p} step / its encoder matmul: {best[top] / best[mm]:.2f}x best, "
              f"{med[top] / med[mm]:.2f}x median (target <= 2x)")
        for rule, target in (("mutual_choice", 0.95), ("feature_choice", 0.8)):
            v = f"ours {rule} {p}"
            print(f"  ours {rule} tokens/s / topk's: {best[top] / best[v]:.2f} best, "
                  f"{med[top] / med[v]:.2f} median (target >= {target})")
        if not args.no_sparsify:
            v = f"sparsify topk {p}"
            print(f"  ours topk / sparsify tokens/s per step: {best[v] / best[top]:.2f}x best, "
                  f"{med[v] / med[top]:.2f}x median (target >= 2x)")


def profile_step(x: torch.Tensor, cfg: TrainConfig, n_steps: int = 5, rows: int = 20) -> str:
    from torch.profiler import ProfilerActivity, profile

    step = step_runner(x, cfg)
    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(n_steps):
            step()
    return prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40, max_shapes_column_width=56)


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m | tiny-random (smoke run)")
    ap.add_argument("--layer", type=int, default=None, help="residual stream layer (default 15; tiny: 1)")
    ap.add_argument("--n-tokens", type=int, default=300_000, help="training tokens in the store")
    ap.add_argument("--n-test-tokens", type=int, default=50_000, help="held-out tokens (split=test)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="training runs per variant (alternating)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--step-rounds", type=int, default=12, help="timed steps / matmuls per kind (alternating)")
    ap.add_argument("--step-batches", type=int, nargs="+", default=[1024, 4096],
                    help="batch sizes of the step-vs-matmul tables")
    ap.add_argument("--dead-fraction", type=float, default=0.0,
                    help="share of dead latents (AuxK trains them) in our steps of the step tables")
    ap.add_argument("--no-sae-lens", action="store_true")
    ap.add_argument("--no-sparsify", action="store_true")
    args = ap.parse_args()
    if not args.no_sparsify:
        try:
            import sparsify  # noqa: F401
        except ImportError:
            raise SystemExit("sparsify is not installed: `.venv/bin/pip install -c constraints.txt -e .[bench]` "
                             "(or pass --no-sparsify)")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")

    layer = args.layer if args.layer is not None else (1 if args.model == "tiny-random" else 15)
    hook = f"blocks.{layer}.hook_resid_post"
    spec = dict(model=args.model, hooks=(hook,), with_loss=False, dtype="bfloat16")
    t0 = time.perf_counter()
    train_store = collect(ActivationSpec(n_tokens=args.n_tokens, **spec))
    test_store = collect(ActivationSpec(n_tokens=args.n_test_tokens, split="test", **spec))
    x, x_test = train_store.load(hook), test_store.load(hook)
    n, d = x.shape
    B, k = args.batch_size, args.k
    L = args.expansion * d
    print(f"# bench_train  {time.strftime('%Y-%m-%d %H:%M')}  torch {torch.__version__}  threads {args.threads}  "
          f"cores {os.cpu_count()}  load average {os.getloadavg()[0]:.1f} "
          "(a shared machine: other jobs slow every number)")
    print(f"data: {args.model} {hook}  train {n} tokens, held-out {len(x_test)} (split=test), d_in {d}, "
          f"bf16 store  (collect/load {time.perf_counter() - t0:.0f} s)")
    # bf16 only where the CPU has it natively (AMX / AVX512-BF16): emulated, it is ~100x slower
    native = native_bf16()
    precisions = ("bf16", "fp32") if native else ("fp32",)
    fast = precisions[0]
    print(f"bf16: {'native' if native else 'NOT native on this CPU (no AMX / AVX512-BF16): bf16 variants skipped'}")
    cfg_top = our_cfg(args, "topk", fast == "bf16")
    steps = max(1, int(args.epochs * (n // B)))
    print(f"SAE: TopK k={k}, n_latents={L}, batch {B}, {steps} steps = {steps * B} tokens, "
          f"lr {cfg_top.resolved_lr(L):.3g}, Adam(0.9, 0.999), AuxK on\n")

    # --- the training runs, variants alternating
    variants: dict[str, Callable[[], tuple[Any, float]]] = {
        f"ours topk {p}": (lambda p=p: run_ours(x, our_cfg(args, "topk", p == "bf16"))) for p in precisions}
    for rule in ("mutual_choice", "feature_choice"):
        variants[f"ours {rule} {fast}"] = lambda rule=rule: run_ours(x, our_cfg(args, rule, fast == "bf16"))
    if not args.no_sparsify:
        variants["sparsify topk fp32"] = lambda: run_sparsify(x, args, cfg_top, bf16=False)
        if native:
            variants["sparsify topk bf16-autocast"] = lambda: run_sparsify(x, args, cfg_top, bf16=True)
    if not args.no_sae_lens:
        variants["sae-lens topk fp32"] = lambda: run_sae_lens(x, args, cfg_top, autocast=False)
        if native:
            variants["sae-lens topk bf16-autocast"] = lambda: run_sae_lens(x, args, cfg_top, autocast=True)
    tps: dict[str, list[float]] = {v: [] for v in variants}
    quality: dict[str, dict[str, float]] = {}
    mem: dict[str, tuple[float, float]] = {}
    for r in range(args.repeats):
        for name, fn in variants.items():
            with PeakRSS() as pk:
                sae, dt = fn()
            tps[name].append(steps * B / dt)
            rise = pk.peak - pk.start
            if name not in mem or rise > mem[name][1]:
                mem[name] = (pk.peak, rise)
            if r == 0:
                if name.startswith("ours"):
                    ev = evaluate(sae, x_test)
                    quality[name] = {"fvu": ev["fvu"], "l0": ev["l0"]}
                elif name.startswith("sparsify"):
                    quality[name] = heldout_sparsify(sae, x_test)
                else:
                    quality[name] = heldout_sae_lens(sae, x_test)
            print(f"  run {r + 1} {name:28s} {dt:7.1f} s  {steps * B / dt:8.0f} tok/s  "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
            del sae

    print(f"\n{'variant':28s} {'tokens/s':>30s}  {'held-out FVU':>12s} {'L0':>5s}  {'peak RSS (rise in run)':>22s}")
    for name in variants:
        q = quality[name]
        print(f"{name:28s} {stats(tps[name]):>30s}  {q['fvu']:12.4f} {q['l0']:5.1f}  "
              f"{mem[name][0]:7.0f} MB ({mem[name][1]:+5.0f} MB)")

    best = {v: max(t) for v, t in tps.items()}
    med = {v: statistics.median(t) for v, t in tps.items()}
    print()
    pairs = []  # (ours, peer, the target ratio)
    for peer, target in (("sparsify", 2.0), ("sae-lens", 5.0)):
        if not getattr(args, f"no_{peer.replace('-', '_')}"):
            pairs += [("ours topk fp32", f"{peer} topk fp32", target)]
            if native:
                pairs = [("ours topk bf16", f"{peer} topk bf16-autocast", target)] + pairs
    for ours, theirs, target in pairs:
        print(f"tokens/s {ours} / {theirs}: best {best[ours] / best[theirs]:.2f}x, median "
              f"{med[ours] / med[theirs]:.2f}x (target >= {target:g}x);  held-out FVU "
              f"{quality[ours]['fvu']:.4f} vs {quality[theirs]['fvu']:.4f}")
    for rule, target in (("mutual_choice", 0.95), ("feature_choice", 0.8)):
        v, top = f"ours {rule} {fast}", f"ours topk {fast}"
        print(f"{v} tokens/s relative to {top}: best {best[v] / best[top]:.2f}, "
              f"median {med[v] / med[top]:.2f} (target >= {target})")

    # --- one step against the one dense matmul it needs, at each batch size, timed alternating
    for B_step in args.step_batches:
        step_table(x, args, B_step, precisions)

    print(f"\nprofile of ours topk {fast}, 5 train_steps, by self CPU time:")
    print(profile_step(x, cfg_top))
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
