"""Benchmark: training a JumpReLU SAE, ours (`sae_repro.jumprelu`) against SAELens's
`JumpReLUTrainingSAE` driven by its `SAETrainer`, in one process, on identical activations (the
default model's layer-15 residual stream, the store `bench_train.py` uses), the same token order,
number of tokens, lr, schedule (warmup 5%, linear decay over the last 20%) and Adam betas
(0.0, 0.999, Gemma Scope's).

Both aim at the same L0: ours with its controller on the L0 coefficient (`target_l0`), SAELens
with its Gemma Scope 2 "quadratic" sparsity loss around `target_l0`. Both train on activations
scaled to E||x||^2 = d (Gemma Scope's normalisation; ours folds the scale back into the SAE,
SAELens is given the scaled data and scored on scaled held-out data: FVU does not depend on the
scale). What they do differently and keep: SAELens trains theta directly (ours log theta), starts
it at 0.01 (ours at the initial pre-activation quantile of the target L0), does not keep unit
decoder rows, and uses an unnormalised squared error.

Printed per variant: tokens/s of the whole training run, held-out FVU and L0
(`sae_repro.metrics.fvu`), and the ratios ours / SAELens.

    .venv/bin/python bench/bench_jumprelu.py                        # 300k tokens, smollm2-135m
    .venv/bin/python bench/bench_jumprelu.py --model tiny-random --n-tokens 40000   # smoke
"""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any

import torch
from bench_train import batches, heldout_sae_lens

from sae_repro.activations import ActivationSpec, collect
from sae_repro.jumprelu import JumpReLUConfig, train_jumprelu
from sae_repro.metrics import fvu
from sae_repro.train import reconstruct


def run_ours(x: torch.Tensor, args) -> tuple[Any, float]:
    cfg = JumpReLUConfig(expansion=args.expansion, target_l0=args.l0, batch_size=args.batch_size,
                         epochs=args.epochs, lr=args.lr, seed=0, log_every=10**9)
    t0 = time.perf_counter()
    sae, _ = train_jumprelu(x, cfg)
    return sae, time.perf_counter() - t0


def run_sae_lens(x_scaled: torch.Tensor, args) -> tuple[Any, float]:
    from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    n, d = x_scaled.shape
    B = args.batch_size
    total = max(1, int(args.epochs * (n // B)))
    warmup = min(1000, total // 20)
    decay = total - int(total * 0.8)
    torch.manual_seed(0)
    sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
        d_in=d, d_sae=args.expansion * d, dtype="float32", device="cpu",
        jumprelu_sparsity_loss_mode="quadratic", target_l0=args.l0, l0_coefficient=args.sae_lens_l0_coef,
        l0_warm_up_steps=int(0.1 * total)))
    tcfg = SAETrainerConfig(total_training_samples=total * B, train_batch_size_samples=B, lr=args.lr,
                            lr_end=args.lr, lr_scheduler_name="constant", lr_warm_up_steps=warmup,
                            lr_decay_steps=decay, adam_beta1=0.0, adam_beta2=0.999, device="cpu",
                            autocast=False)
    trainer = SAETrainer(tcfg, sae, batches(x_scaled, B))
    t0 = time.perf_counter()
    trainer.fit()
    return sae, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--n-tokens", type=int, default=300_000)
    ap.add_argument("--n-test-tokens", type=int, default=20_000)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--l0", type=float, default=32.0, help="the target L0 of both trainers")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--sae-lens-l0-coef", type=float, default=1.0, help="SAELens's quadratic-loss coefficient")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")

    layer = args.layer if args.layer is not None else (1 if args.model == "tiny-random" else 15)
    hook = f"blocks.{layer}.hook_resid_post"
    spec = dict(model=args.model, hooks=(hook,), with_loss=False, dtype="bfloat16")
    t0 = time.perf_counter()
    x = collect(ActivationSpec(n_tokens=args.n_tokens, **spec)).load(hook).float()
    x_test = collect(ActivationSpec(n_tokens=args.n_test_tokens, split="test", **spec)).load(hook).float()
    n, d = x.shape
    s = math.sqrt(d / float(x.double().pow(2).sum(1).mean()))
    print(f"# bench_jumprelu  {time.strftime('%Y-%m-%d %H:%M')}  torch {torch.__version__}  threads {args.threads}  "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"data: {args.model} {hook}  train {n} tokens, held-out {len(x_test)}, d_in {d}, fp32 "
          f"(collect/load {time.perf_counter() - t0:.0f} s); scale s = {s:.4g}")
    steps = max(1, int(args.epochs * (n // args.batch_size)))
    print(f"SAE: JumpReLU, {args.expansion * d} latents, target L0 {args.l0:g}, batch {args.batch_size}, "
          f"{steps} steps, lr {args.lr:g}, Adam(0.0, 0.999)\n")

    ours, t_ours = run_ours(x, args)
    x_hat, l0 = reconstruct(ours, x_test)
    q_ours = {"fvu": fvu(x_test, x_hat), "l0": float(l0.float().mean())}
    theirs, t_theirs = run_sae_lens(x * s, args)
    q_theirs = heldout_sae_lens(theirs, x_test * s)
    rows = {"ours": (t_ours, q_ours), "sae-lens": (t_theirs, q_theirs)}
    print(f"{'variant':<10} {'tokens/s':>10} {'held-out FVU':>13} {'held-out L0':>12}")
    for name, (t, q) in rows.items():
        print(f"{name:<10} {steps * args.batch_size / t:>10.0f} {q['fvu']:>13.4f} {q['l0']:>12.1f}")
    print(f"\nours / sae-lens: tokens/s {t_theirs / t_ours:.2f}x, FVU {q_ours['fvu'] / q_theirs['fvu']:.3f}, "
          f"L0 {q_ours['l0'] / q_theirs['l0']:.3f}")


if __name__ == "__main__":
    main()
