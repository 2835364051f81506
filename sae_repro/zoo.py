"""Trained SAEs, cached on disk by the hash of what made them.

    sae, history = trained_sae(store, TrainConfig(k=32, rule="mutual_choice"), hook=hook)

The key covers the data (an activation store's content-addressed name, or the sha256 of a
tensor's bytes), the hook, every field of the TrainConfig and the starting SAE for fine-tunes.
A finished SAE is saved in the SAELens on-disk format (`cfg.json` + `sae_weights.safetensors`)
with its training history as CSV and the sha256 of each file (`checksums.json`, verified on
every load: a damaged or truncated SAE is retrained with a warning naming it); the folder is
renamed into place only when complete, and training checkpoints let a killed run resume.

The budget ladder (`TrainConfig.ladder`): the rung SAEs that `train_sae` branches off are saved
as they finish (next to the checkpoint, so a killed run keeps them) and then inside the SAE's
folder, `rungs/<steps>/` with `rung.json` (their last history row), under the same checksums;
`ladder(key)` reads them back with the finished SAE as the top rung.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pandas as pd
from torch import Tensor

from sae_repro.activations import ActivationStore
from sae_repro.cache import atomic_path, cache_dir, folder_problem, hash_inputs, tensor_digest, write_checksums
from sae_repro.jumprelu import TRAINER_VERSION, JumpReLUConfig, config_dict, train_jumprelu
from sae_repro.sae import SparseAutoencoder
from sae_repro.saelens import load, save
from sae_repro.train import NEUTRAL_FIELDS, TrainConfig, train_sae

FORMAT_VERSION = 1


def sae_key(data_id: str, hook: str | None, cfg: TrainConfig, init_key: str | None = None) -> str:
    """The cache key of an SAE: its data (a store's name or a caller's key), hook, config, init."""
    return hash_inputs({"format": FORMAT_VERSION, "store": data_id, "hook": hook,
                        "cfg": {k: v for k, v in asdict(cfg).items() if k not in NEUTRAL_FIELDS},
                        "init": init_key})


def trained_sae(data: ActivationStore | Tensor, cfg: TrainConfig, *, hook: str | None = None,
                data_key: str | None = None, grads: Tensor | None = None,
                init: tuple[SparseAutoencoder, str] | None = None, heldout: Tensor | None = None,
                progress: bool = True) -> tuple[SparseAutoencoder, pd.DataFrame, str]:
    """Train (or load from the cache) an SAE on `store[hook]` -> (sae, history, key).

    data: an ActivationStore (with `hook` naming the tensor if it holds several), or a tensor
    x [n, d] derived from one (e.g. the linear part of another SAE's error), keyed by the sha256
    of its bytes (and `data_key`, an optional label, e.g. how it was made): a tensor computed
    differently by another code version never reuses a stale SAE.
    grads: loss gradients for a g-SAE trained on a tensor (a store supplies its own).
    init: (sae, its key) to fine-tune from, e.g. Feature Choice from a Mutual Choice SAE.
    heldout: activations [n, d] to follow the held-out FVU on while training (`train_sae`); part
    of the key, since the history it writes differs (the weights do not).
    """
    if isinstance(data, Tensor):
        data_id = f"tensor:{tensor_digest(data)}:{data_key or ''}"
    else:
        hook = hook if hook is not None else _only_hook(data)
        data_id = data.root.name
    if heldout is not None:
        data_id += f"|heldout:{tensor_digest(heldout)}"
    key = sae_key(data_id, hook, cfg, init[1] if init else None)
    root = cache_dir() / "saes" / key
    if (hit := _cached(root, key)) is not None:
        return hit[0].to(cfg.device), hit[1], key
    ckpt = cache_dir() / "checkpoints" / key
    if cfg.checkpoint_every is None:  # long runs resume after a kill
        cfg = replace(cfg, checkpoint_every=100)
    sae, history = train_sae(data, cfg, hook=hook, grads=grads, init=init[0] if init else None,
                             checkpoint_dir=ckpt, progress=progress, heldout=heldout,
                             on_rung=lambda rung, row: _save_rung(ckpt / RUNGS / f"{row['step']:07d}", rung, row))
    with atomic_path(root) as tmp:
        save(sae, tmp)
        pd.DataFrame(history).to_csv(tmp / "history.csv", index=False)
        if (ckpt / RUNGS).exists():
            shutil.copytree(ckpt / RUNGS, tmp / RUNGS)
        write_checksums(tmp)  # verified on every load: a damaged SAE is retrained, never used
    shutil.rmtree(ckpt, ignore_errors=True)  # a finished SAE never resumes
    return sae, pd.DataFrame(history), key


RUNGS = "rungs"


def trained_jumprelu(data: ActivationStore | Tensor, cfg: JumpReLUConfig, *, hook: str | None = None,
                     data_key: str | None = None, heldout: Tensor | None = None,
                     progress: bool = False) -> tuple[SparseAutoencoder, pd.DataFrame, str]:
    """Train (or load from the cache) a JumpReLU SAE (`jumprelu.train_jumprelu`) on
    `store[hook]`, or on a tensor x [n, d] derived from one (keyed by its bytes and `data_key`, as
    in `trained_sae`) -> (sae, history, key); cached, checksummed and written atomically like
    `trained_sae`, keyed by the data, hook, config and the held-out tokens it follows."""
    if isinstance(data, Tensor):
        data_id = f"tensor:{tensor_digest(data)}:{data_key or ''}"
    else:
        hook = hook if hook is not None else _only_hook(data)
        data_id = data.root.name
    data_id += f"|heldout:{tensor_digest(heldout)}" if heldout is not None else ""
    key = hash_inputs({"format": FORMAT_VERSION, "kind": "jumprelu", "trainer": TRAINER_VERSION,
                       "store": data_id, "hook": hook, "cfg": config_dict(cfg)})
    root = cache_dir() / "saes" / key
    if (hit := _cached(root, key)) is not None:
        return hit[0], hit[1], key
    x = data if isinstance(data, Tensor) else data.load(hook)
    sae, history = train_jumprelu(x.float(), cfg, heldout=heldout, progress=progress)
    with atomic_path(root) as tmp:
        save(sae, tmp)
        history.to_csv(tmp / "history.csv", index=False)
        write_checksums(tmp)
    return sae, history, key


def _cached(root: Path, key: str) -> tuple[SparseAutoencoder, pd.DataFrame] | None:
    """(sae, history) of the finished SAE in `root` if its checksums hold; a damaged one is
    removed with a warning (the caller retrains it); None when there is none."""
    if not root.exists():
        return None
    problem = folder_problem(root)
    if problem is None:
        return load(root), pd.read_csv(root / "history.csv")
    warnings.warn(f"trained SAE {key}: {problem}; retraining it")
    shutil.rmtree(root)
    return None


def _save_rung(folder: Path, sae: SparseAutoencoder, row: dict[str, Any]) -> None:
    with atomic_path(folder) as tmp:
        save(sae, tmp)
        (tmp / "rung.json").write_text(json.dumps(row, indent=1))


def ladder(key: str) -> list[tuple[dict[str, Any], SparseAutoencoder]]:
    """The budget ladder of the cached SAE `key`: (row, sae) per rung, by steps, the finished SAE
    last (its history's last row); row: step, tokens, heldout_fvu, ..., rung_share. Verified
    against the folder's checksums (a damaged folder raises: `trained_sae` retrains it)."""
    root = cache_dir() / "saes" / key
    problem = folder_problem(root) if root.exists() else f"no trained SAE {key} in {root.parent}"
    if problem is not None:
        raise ValueError(f"ladder({key!r}): {problem}")
    rungs = [(json.loads((f / "rung.json").read_text()), load(f)) for f in sorted((root / RUNGS).glob("*"))]
    last = pd.read_csv(root / "history.csv").iloc[-1].to_dict()
    return rungs + [(last | {"rung_share": 1.0}, load(root))]


def _only_hook(store: ActivationStore) -> str:
    if len(store.spec.hooks) != 1:
        raise ValueError(f"hook=None but the store has hooks {list(store.spec.hooks)}: name one")
    return store.spec.hooks[0]
