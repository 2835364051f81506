"""Benchmark: gradient pursuit, ours (`sae_repro.decomposition.gradient_pursuit`: sparse slots,
live tokens only) against the dense formulation of the Dark Matter authors' code (every step
over every token: codes @ W, r @ W.T and g @ W as dense products; support = codes != 0) and
against dictionary_learning's `grad_pursuit` (the same dense steps, a support that keeps a latent
once picked, one budget for all tokens), in one process on the same inputs.

Shapes of the default profile's main SAE (smollm2-135m, d 576, 8x = 4,608 latents) and of one
`pursuit_reconstruct` batch (2^24 // 4,608 = 3,640 tokens). A seeded random signal and unit-norm
dictionary: the cost does not depend on the values, only on the budgets. Two budgets: 32 steps
for every token (TopK, k 32) and a JumpReLU-like one that varies per token (Gamma, mean 38;
the dense formulation runs every token to the batch's largest budget).

Printed: seconds of each, the ratio to ours, and ours' largest code difference from the dense
formulation (float summation order; a near-tie of the argmax can send a token down another
path: that token is counted).

    .venv/bin/python bench/bench_pursuit.py [--n-tokens 3640] [--width 4608] [--d 576]

dictionary_learning is optional (`pip install --no-deps dictionary-learning==0.1.0`; only its
`grad_pursuit.py`, which needs nothing but torch, is loaded).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time

import torch

from sae_repro.decomposition import gradient_pursuit


@torch.no_grad()
def dense_pursuit(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """The authors' dense steps, a token frozen after its budget (our code before 2026-12-04)."""
    signal, codes = x - b, torch.zeros(x.shape[0], W.shape[0])
    rows = torch.arange(x.shape[0])
    for step in range(int(steps.max())):
        r = signal - codes @ W
        corr = r @ W.T
        support = codes != 0
        support[rows, corr.argmax(1)] = True
        g = corr * support
        c = g @ W
        num, den = (c * r).sum(1), (c * c).sum(1)
        new = (codes + torch.where(den > 0, num / den.clamp_min(1e-38), 0.0)[:, None] * g).clamp_min(0)
        codes = torch.where((steps > step)[:, None], new, codes)
    return codes


def dictionary_learning_pursuit():
    spec = importlib.util.find_spec("dictionary_learning")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "grad_pursuit.py")
    mod_spec = importlib.util.spec_from_file_location("dl_grad_pursuit", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.grad_pursuit


def timed(f, *args):
    t0 = time.perf_counter()
    out = f(*args)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-tokens", type=int, default=3640)
    ap.add_argument("--width", type=int, default=4608)
    ap.add_argument("--d", type=int, default=576)
    args = ap.parse_args()
    torch.manual_seed(0)
    W = torch.randn(args.width, args.d)
    W /= W.norm(dim=1, keepdim=True)
    b = 0.1 * torch.randn(args.d)
    x = torch.randn(args.n_tokens, args.d) + b
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}; "
          f"{args.n_tokens} tokens, d {args.d}, {args.width} latents")
    dl = dictionary_learning_pursuit()
    jumprelu = torch.distributions.Gamma(2.0, 2.0 / 38).sample((args.n_tokens,)).round().long().clamp(1, 400)
    for name, steps in [("k 32 every token", torch.full((args.n_tokens,), 32)), ("JumpReLU-like", jumprelu)]:
        print(f"\n{name}: steps mean {steps.float().mean():.1f}, max {int(steps.max())}")
        ours, t_ours = timed(gradient_pursuit, x, W, b, steps)
        ref, t_ref = timed(dense_pursuit, x, W, b, steps)
        off = ((ours - ref).abs().amax(1) > 1e-3).sum()
        print(f"  ours                 {t_ours:7.2f} s")
        print(f"  dense (authors')     {t_ref:7.2f} s   ratio {t_ref / t_ours:5.1f}x   max |codes diff| "
              f"{(ours - ref).abs().max():.1e}, tokens off by > 1e-3: {int(off)}")
        if dl is not None and name.startswith("k 32"):
            _, t_dl = timed(dl, x - b, W.T.contiguous(), 32)
            print(f"  dictionary_learning  {t_dl:7.2f} s   ratio {t_dl / t_ours:5.1f}x")


if __name__ == "__main__":
    main()
