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


_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def sha256_file(path: Path, chunk: int = 1 << 20, memo: bool = False) -> str:
    """sha256 of a file's bytes. memo=True remembers it per (path, size, mtime) in this process, so
    that a store checked by several notebooks' skip decisions in one run is read once."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if memo and key in _SHA_MEMO:
        return _SHA_MEMO[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    _SHA_MEMO[key] = h.hexdigest()
    return _SHA_MEMO[key]


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
        _normal_modes(tmp_path)
        os.replace(tmp_path, final) if not final.is_dir() else _replace_dir(tmp_path, final)
    finally:
        if tmp_path.is_dir():
            shutil.rmtree(tmp_path, ignore_errors=True)
        elif tmp_path.exists():
            tmp_path.unlink()


_UMASK = os.umask(0)
os.umask(_UMASK)  # read once, at import: setting it is process-wide


def _normal_modes(path: Path) -> None:
    """Give what a writer created the modes of a plain open() under the umask (some writers use
    private temporary files: shards and weights came out 0600 beside 0644 JSON)."""
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~_UMASK)


def _replace_dir(tmp: Path, final: Path) -> None:
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Checksums: every cached artifact has one, written after it and verified when it is loaded

CHECKSUMS_FILE = "checksums.json"


def write_checksums(folder: Path) -> None:
    """Record the sha256 of every file under `folder` (by relative path) in `folder/checksums.json`
    (call it last, inside the atomic write of the folder)."""
    folder = Path(folder)
    sums = {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != CHECKSUMS_FILE}
    (folder / CHECKSUMS_FILE).write_text(json.dumps(sums, indent=1, sort_keys=True))


def folder_problem(folder: Path) -> str | None:
    """Why `folder` does not match its checksums.json (a file missing, changed or unlisted), or
    None if it does."""
    folder = Path(folder)
    try:
        sums = json.loads((folder / CHECKSUMS_FILE).read_text())
    except (OSError, ValueError):  # missing, bad JSON or not UTF-8
        return f"{folder / CHECKSUMS_FILE} is missing or unreadable"
    for name, want in sums.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if sha256_file(path) != want:
            return f"{path} does not match its checksum (a damaged or truncated file)"
    return None


def write_file_checksum(path: Path) -> None:
    """`path`'s sha256 in the sidecar `path.sha256` (written after the file, atomically)."""
    with atomic_path(Path(f"{path}.sha256")) as tmp:
        tmp.write_text(sha256_file(path))


def file_problem(path: Path) -> str | None:
    """Why `path` does not match its `.sha256` sidecar, or None if it does."""
    side = Path(f"{path}.sha256")
    if not Path(path).is_file() or not side.is_file():
        return f"{path} or its checksum {side.name} is missing"
    if side.read_text().strip() != sha256_file(path):
        return f"{path} does not match its checksum (a damaged or truncated file)"
    return None


def read_json(path: Path) -> dict:
    """The JSON object at `path` ({} if there is none); a damaged file raises a ValueError that
    names it and says what to do (a record like a manifest cannot be rebuilt from the cache)."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:  # bad JSON, or not even UTF-8
        raise ValueError(f"{path} is damaged (not readable JSON): delete it and rerun the notebooks "
                         f"that write it (`sae-repro run --force`)") from None


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
        obj = read_json(path)
        update(obj)
        write_json(path, obj)
    return obj
