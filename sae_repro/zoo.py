"""Trained SAEs, cached on disk by the hash of what made them.

    sae, history = trained_sae(store, TrainConfig(k=32, rule="mutual_choice"), hook=hook)

The key covers the activation store (its content-addressed name), the hook, every field of the
TrainConfig and the starting SAE for fine-tunes. A finished SAE is saved in the SAELens on-disk
format (`cfg.json` + `sae_weights.safetensors`) with its training history as CSV; the folder is
renamed into place only when complete, and training checkpoints let a killed run resume.
"""

from __future__ import annotations

from dataclasses import asdict, replace

import pandas as pd

from sae_repro.activations import ActivationStore
from sae_repro.cache import atomic_path, cache_dir, hash_inputs
from sae_repro.sae import SparseAutoencoder
from sae_repro.train import TrainConfig, train_sae

FORMAT_VERSION = 1


def sae_key(store: ActivationStore, hook: str | None, cfg: TrainConfig, init_key: str | None = None) -> str:
    return hash_inputs({"format": FORMAT_VERSION, "store": store.root.name, "hook": hook,
                        "cfg": {k: v for k, v in asdict(cfg).items() if k not in ("log_every",
                                                                                   "checkpoint_every")},
                        "init": init_key})


def trained_sae(store: ActivationStore, cfg: TrainConfig, *, hook: str | None = None,
                init: tuple[SparseAutoencoder, str] | None = None,
                progress: bool = True) -> tuple[SparseAutoencoder, pd.DataFrame, str]:
    """Train (or load from the cache) an SAE on `store[hook]` -> (sae, history, key).

    init: (sae, its key) to fine-tune from, e.g. Feature Choice from a Mutual Choice SAE.
    """
    key = sae_key(store, hook, cfg, init[1] if init else None)
    root = cache_dir() / "saes" / key
    if (root / "history.csv").exists():
        return SparseAutoencoder.load(root), pd.read_csv(root / "history.csv"), key
    ckpt = cache_dir() / "checkpoints" / key
    if cfg.checkpoint_every is None:  # long runs resume after a kill
        cfg = replace(cfg, checkpoint_every=100)
    sae, history = train_sae(store, cfg, hook=hook, init=init[0] if init else None,
                             checkpoint_dir=ckpt, progress=progress)
    sae.calibrate_threshold(store.load(hook), cfg.batch_size)
    with atomic_path(root) as tmp:
        sae.save(tmp)
        pd.DataFrame(history).to_csv(tmp / "history.csv", index=False)
    return sae, pd.DataFrame(history), key
