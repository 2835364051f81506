"""Content-addressed, atomically written on-disk cache.

Every artifact (downloaded package, converted model, activation shards, trained SAE) lives
under `cache_dir() / kind / key`, where `key` is a hash of the inputs that produced it.
Writes go to a temporary sibling and are renamed into place, so a killed run never leaves a
half-written file that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch


def cache_dir() -> Path:
    """Root of all caches: $SAE_REPRO_CACHE, else `.cache/` at the repository root."""
    env = os.environ.get("SAE_REPRO_CACHE")
    root = Path(env) if env else Path(__file__).resolve().parent.parent / ".cache"
    root.mkdir(parents=True, exist_ok=True)
    return root


def hash_inputs(obj: Any, n: int = 16) -> str:
    """Stable short hash of a JSON-serialisable description of inputs."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def tensor_digest(x: torch.Tensor, n: int = 16) -> str:
    """Short sha256 of a tensor's dtype, shape and bytes: a content address (~1 s per GB)."""
    h = hashlib.sha256(f"{x.dtype}{tuple(x.shape)}".encode())
    h.update(x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()[:n]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path next to `final`; rename it onto `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=f"-{final.name}", dir=final.parent)
    os.close(fd)
    os.unlink(tmp)  # the caller creates a file or a directory there
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final) if not final.is_dir() else _replace_dir(tmp_path, final)
    finally:
        if tmp_path.is_dir():
            shutil.rmtree(tmp_path, ignore_errors=True)
        elif tmp_path.exists():
            tmp_path.unlink()


def _replace_dir(tmp: Path, final: Path) -> None:
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock named after `path` (for read-modify-write by parallel notebooks)."""
    import fcntl  # POSIX only, like the rest of the pipeline

    lock = cache_dir() / "locks" / f"{hash_inputs(str(Path(path).resolve()))}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def update_json(path: Path, update: Callable[[dict], None]) -> dict:
    """Apply `update` to the JSON object at `path` (empty if missing) under a lock; atomic write."""
    path = Path(path)
    with locked(path):
        obj = json.loads(path.read_text()) if path.exists() else {}
        update(obj)
        write_json(path, obj)
    return obj
