"""Benchmark: collecting activations at a middle layer of the default model.

Runs, each in a fresh subprocess (so peak memory is per configuration) and a fresh cache:
  stop      : activations only; the forward pass stops after the hooked layer
  full      : activations + per-token loss (whole forward pass, unembedding included)
  full-bf16 : the same under bf16 autocast (only where bf16 is native: AMX / AVX512-BF16;
              emulated on an AVX2-only CPU it is ~7x slower than fp32 and is skipped)
  grad      : activations + loss + d(loss)/d(activation) (forward + backward; --with-grad)
and prints tokens/s, peak RSS, the share of time saved by stopping at the layer, the mean
next-token loss of fp32 vs bf16 autocast, and each configuration's share of the forward's FLOP
roofline: the tokens/s the model's matmuls would allow if each ran at the speed this machine
gives that matmul's own shape (timed in the same run, in the configuration's precision).

    .venv/bin/python bench/bench_activations.py [--n-tokens 100000] [--layer 15] [--with-grad]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "stop": dict(with_loss=False),
    "full": dict(with_loss=True),
    "full-bf16": dict(with_loss=True, autocast_bf16=True),
    "grad": dict(with_loss=True, with_grad=True),
}


def child(name: str, n_tokens: int, layer: int) -> None:
    import torch

    from sae_repro.activations import ActivationSpec, collect
    from sae_repro.models import load_model

    model = load_model()  # loading (and the one-time conversion) is not timed
    spec = ActivationSpec(hooks=(f"blocks.{layer}.hook_resid_post",), n_tokens=n_tokens,
                          **CONFIGS[name])
    t0 = time.perf_counter()
    store = collect(spec, model=model, progress=False)
    dt = time.perf_counter() - t0
    loss = float(store.load("loss").mean()) if "loss" in store.manifest["tensors"] else None
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"config": name, "seconds": dt, "tokens_per_s": n_tokens / dt,
                      "peak_rss_mb": peak_mb, "mean_loss": loss, "threads": torch.get_num_threads()}))


def forward_matmuls(cfg, n_blocks: int, ctx: int, unembed: bool) -> list[tuple[str, int, int, int, int]]:
    """The matmuls of a forward over `n_blocks` blocks (+ the unembedding), per context of `ctx`
    tokens, as (what, count, m, k, n): [m, k] x [k, n] products. Llama-style blocks (GQA
    attention as TransformerLens computes it: full [ctx, ctx] scores per head; gated MLP)."""
    d, h, dh, kv, f = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.n_key_value_heads or cfg.n_heads, cfg.d_mlp
    mats = [("W_Q, W_O", 2 * n_blocks, ctx, d, h * dh), ("W_K, W_V", 2 * n_blocks, ctx, d, kv * dh),
            ("QK^T, AV", 2 * n_blocks * h, ctx, dh, ctx),
            ("MLP in, gate, out", (3 if cfg.gated_mlp else 2) * n_blocks, ctx, d, f)]
    return mats + ([("unembed", 1, ctx, d, cfg.d_vocab)] if unembed else [])


def roofline_tokens_per_s(cfg, n_blocks: int, ctx: int, batch: int, unembed: bool, dtype,
                          rounds: int = 5) -> tuple[float, float]:
    """The forward's tokens/s if every matmul ran at the speed this machine gives that matmul's
    own shape (timed here, batched over `batch` contexts as the collector runs them, best of
    `rounds`) and nothing else cost anything -> (tokens/s, GFLOP per token)."""
    import torch

    seconds, flops = 0.0, 0.0
    for _, count, m, k, n in forward_matmuls(cfg, n_blocks, ctx, unembed):
        a, b = torch.randn(batch, m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        a @ b
        best = min(_timed(lambda: a @ b) for _ in range(rounds))
        seconds += count * best
        flops += count * 2 * m * k * n
    tokens = batch * ctx
    return tokens / seconds, flops / ctx / 1e9  # flops are per context


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-tokens", type=int, default=100_000)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--with-grad", action="store_true", help="also time gradient collection (slow)")
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.n_tokens, args.layer)
    from sae_repro.activations import ActivationSpec, collect
    from sae_repro.pipeline import hardware
    from sae_repro.precision import native_bf16

    # convert the model and tokenize the corpus once, outside the timed runs
    collect(ActivationSpec(hooks=(f"blocks.{args.layer}.hook_resid_post",), n_tokens=100,
                           with_loss=False), progress=False)
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores ({hardware()['cpu']})",
          flush=True)
    rows = {}
    for name in CONFIGS:
        if name == "grad" and not args.with_grad:
            continue
        if name == "full-bf16" and not native_bf16():
            print("full-bf16  skipped: this CPU has no native bf16 (AMX / AVX512-BF16)", flush=True)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            env = os.environ.copy()
            real = Path(__file__).resolve().parent.parent / ".cache"
            for sub in ("pypi", "corpus", "models", "tokens"):
                os.symlink(real / sub, Path(tmp) / sub)
            env["SAE_REPRO_CACHE"] = tmp
            out = subprocess.run([sys.executable, __file__, "--child", name, "--n-tokens",
                                  str(args.n_tokens), "--layer", str(args.layer)],
                                 env=env, capture_output=True, text=True, check=True)
            rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
            r = rows[name]
            print(f"{name:10s} {r['tokens_per_s']:8.0f} tok/s  {r['seconds']:7.1f} s  "
                  f"peak RSS {r['peak_rss_mb']:6.0f} MB  loss {r['mean_loss']}", flush=True)
    import torch

    from sae_repro.models import load_model

    cfg = load_model().cfg
    spec = ActivationSpec(hooks=(f"blocks.{args.layer}.hook_resid_post",), n_tokens=100)
    print(f"\nroofline: the forward's matmuls at this machine's speed for their shapes "
          f"({spec.batch_contexts} contexts of {spec.ctx_len} tokens a batch, as collected), nothing else:")
    for name, r in rows.items():
        n_blocks = args.layer + 1 if name == "stop" else cfg.n_layers
        dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
        roof, gflop = roofline_tokens_per_s(cfg, n_blocks, spec.ctx_len, spec.batch_contexts, name != "stop", dtype)
        extra = " (+ the backward's matmuls, ~2x: share of the forward's roofline only)" if name == "grad" else ""
        print(f"  {name:10s} {gflop:5.3f} GFLOP/token, roofline {roof:7.0f} tok/s; collected at "
              f"{r['tokens_per_s']:6.0f} tok/s = {r['tokens_per_s'] / roof:5.1%} of it{extra}")
    saved = 1 - rows["stop"]["seconds"] / rows["full"]["seconds"]
    print(f"stopping at layer {args.layer} of 30 saves {saved:.0%} of the full forward's time")
    if "full-bf16" in rows:
        print(f"bf16 autocast: {rows['full']['seconds'] / rows['full-bf16']['seconds']:.2f}x faster, "
              f"mean loss {rows['full-bf16']['mean_loss']:.4f} vs fp32 {rows['full']['mean_loss']:.4f} "
              f"(diff {abs(rows['full-bf16']['mean_loss'] - rows['full']['mean_loss']):.4f} nats)")


if __name__ == "__main__":
    main()
