"""Data-parallel training (DDP, gloo on CPU) trains the same SAE as one process.

Two ranks, each fed its contiguous half of every global batch, must end with the weights one
process gets from the whole global batch: same b_dec init, loss normalised by the global batch's
variance, gradients averaged, fire counts (hence dead latents and the AuxK pool) summed. The
data has token-dependent scales, so the two halves of a batch have different variances and a
per-rank normaliser would show (it moves the weights by ~1e-3 within 20 steps).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing import assert_close

from sae_repro.sae import SparseAutoencoder
from sae_repro.train import CHECKPOINT_FILE, TrainConfig, train_sae

WORLD, D, LATENTS, K, BATCH, STEPS = 2, 32, 128, 4, 256, 20
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def data(n: int = 4096, seed: int = 0) -> torch.Tensor:
    """Sparse combinations of 256 random unit atoms, each token scaled by a log-normal factor."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(256, D, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    idx = torch.rand(n, 256, generator=g).argsort(1)[:, :8]
    codes = torch.zeros(n, 256).scatter_(1, idx, torch.rand(n, 8, generator=g) + 0.5)
    scale = torch.randn(n, 1, generator=g).mul(0.5).exp()
    return codes @ atoms * scale + 0.3 * torch.randn(D, generator=g)


CONFIGS = {  # name -> TrainConfig fields; the AuxK runs start with dead latents (`init_for`)
    "topk": dict(aux=None),
    "topk_auxk": dict(aux="auxk", dead_window_tokens=2 * BATCH),
    "gradient_topk_auxk": dict(rule="gradient_topk", beta=1.0, aux="auxk", dead_window_tokens=2 * BATCH),
}


def cfg(name: str) -> TrainConfig:
    return TrainConfig(k=K, n_latents=LATENTS, batch_size=BATCH, max_steps=STEPS, lr=1e-2, log_every=5,
                       checkpoint_every=10, **CONFIGS[name])


def grads_for(x: torch.Tensor, name: str) -> torch.Tensor | None:
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(1)) if "gradient" in name else None


def init_for(x: torch.Tensor, name: str) -> SparseAutoencoder | None:
    """AuxK runs: latents 64..127 start as faint copies of 0..63, so they never win the TopK and
    are dead after the window (without it hardly any latent dies in 20 steps)."""
    if "auxk" not in name:
        return None  # fresh init: b_dec from the data sample, on each rank
    sae = SparseAutoencoder(cfg(name).sae_config(D), seed=0)
    sae.init_b_dec(x)
    with torch.no_grad():
        sae.W_enc[:, LATENTS // 2:] = 0.1 * sae.W_enc[:, :LATENTS // 2]
    return sae


def train(x: torch.Tensor, name: str, **kw) -> tuple[SparseAutoencoder, list[dict[str, float]]]:
    return train_sae(x, cfg(name), grads=grads_for(x, name), init=init_for(x, name), progress=False, **kw)


def _worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=WORLD)
    try:
        x = data()
        for name in CONFIGS:
            sae, history = train(x, name, checkpoint_dir=Path(tmp) / f"ck_{name}_{rank}")
            torch.save({"sae": {p: getattr(sae, p).detach() for p in PARAMS}, "history": history},
                       Path(tmp) / f"{name}_{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(tmp),), nprocs=WORLD, join=True)
    return tmp


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ddp_matches_one_process(ddp_runs, name):
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = data()
        one, h_one = train(x, name)
    finally:
        torch.set_num_threads(old)
    runs = [torch.load(ddp_runs / f"{name}_{r}.pt", weights_only=True) for r in range(WORLD)]
    for p in PARAMS:
        for r, run in enumerate(runs):  # every rank ends with the one-process weights
            assert_close(run["sae"][p], getattr(one, p).detach(), rtol=1e-4, atol=1e-5,
                         msg=lambda m, p=p, r=r: f"{p} rank {r}: {m}")
    # the dead-latent statistics are the global batch's on every rank
    dead_one = [row["dead_fraction"] for row in h_one]
    assert all([row["dead_fraction"] for row in run["history"]] == dead_one for run in runs)
    if name != "topk":  # AuxK really took part
        assert max(row["aux"] for row in h_one) > 0 and max(dead_one) > 0
    # only rank 0 writes checkpoints; its last one holds the final weights
    assert not (ddp_runs / f"ck_{name}_1" / CHECKPOINT_FILE).exists()
    blob = torch.load(ddp_runs / f"ck_{name}_0" / CHECKPOINT_FILE, weights_only=True)
    assert blob["step"] == STEPS
    for p in PARAMS:
        assert torch.equal(blob["sae"][p], runs[0]["sae"][p]), p
