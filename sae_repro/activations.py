"""Collect and cache a model's activations, per-token loss and (optionally) loss gradients.

A store is keyed by the hash of everything that determines its content (model identity, hooks,
corpus fingerprint, split, context length, dropped positions, dtype, seed, ...). It lives in
`cache_dir()/activations/<key>/` as fixed-size shards (safetensors) plus `manifest.json`.
Each shard is written atomically with a sidecar recording its sha256; a killed run resumes at the
first missing shard, and a truncated or corrupt shard is detected by its checksum and rebuilt.

Positions: contexts start with BOS; the first `drop_first` positions are dropped (attention-sink
tokens have residual norms ~100x the others in SmolLM2), and so is the last position, which has
no next token. The loss stored at position p is the next-token loss of predicting token p+1.
The gradient stored for a hook is d(sum of the context's next-token losses) / d(activation at p),
taken at the original activation: it does not depend on any SAE (g-SAEs read it).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from sae_repro.cache import (
    atomic_path,
    cache_dir,
    file_problem,
    hash_inputs,
    sha256_file,
    write_file_checksum,
    write_json,
)
from sae_repro.corpus import Corpus, load_corpus, tokenize_contexts
from sae_repro.models import DEFAULT_MODEL, TINY_MODEL, load_model, parse_hook
from sae_repro.precision import resolve_bf16
from sae_repro.progress import Progress
from sae_repro.registry import EMBEDDED_MODEL_TABLE
from sae_repro.timing import timed

FORMAT_VERSION = 2  # 2: the store keeps its contexts (contexts.safetensors)
CONTEXTS_FILE = "contexts.safetensors"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ActivationSpec:
    """Everything that determines a store's content.  n_tokens counts kept positions."""

    model: str = DEFAULT_MODEL
    hooks: tuple[str, ...] = ("blocks.15.hook_resid_post",)
    corpus: str = "gutenberg-shakespeare"
    split: str = "train"
    n_tokens: int = 100_000
    ctx_len: int = 128
    drop_first: int = 4
    with_loss: bool = True
    with_grad: bool = False
    dtype: str = "bfloat16"  # storage dtype of activations and gradients
    autocast_bf16: bool | str = False  # the model's forward under bf16 autocast; "auto": where native
    device: str = "cpu"  # where the model runs (the store is on disk either way)
    contexts_per_shard: int = 256
    batch_contexts: int = 16
    seed: int = 0
    # leave out the first skip_contexts contexts of the seeded order: tokens that a store of the
    # same split and seed (e.g. the one the main SAE trained on) does not hold
    skip_contexts: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: expected one of {sorted(_DTYPES)}")
        if self.split not in ("train", "test"):
            raise ValueError(f"split={self.split!r}: expected 'train' or 'test'")
        if not 0 <= self.drop_first <= self.ctx_len - 2:
            raise ValueError(f"drop_first={self.drop_first}: expected 0..ctx_len-2={self.ctx_len - 2}")
        if self.n_tokens < 1:
            raise ValueError(f"n_tokens={self.n_tokens}: expected a positive number")
        if not self.hooks:
            raise ValueError("hooks=(): name at least one hook point")
        if isinstance(self.skip_contexts, bool) or not isinstance(self.skip_contexts, int) or self.skip_contexts < 0:
            raise ValueError(f"skip_contexts={self.skip_contexts!r}: expected a whole number >= 0")
        object.__setattr__(self, "hooks", tuple(self.hooks))
        # the key holds the resolved bool: a bf16 and an fp32 store are different stores
        object.__setattr__(self, "autocast_bf16",
                           resolve_bf16(self.autocast_bf16, self.device, "autocast_bf16"))

    @property
    def kept_per_context(self) -> int:
        return self.ctx_len - 1 - self.drop_first

    @property
    def n_contexts(self) -> int:
        return math.ceil(self.n_tokens / self.kept_per_context)


def model_identity(name: str, seed: int) -> str:
    """What pins a model's weights: an embedded model's pinned checksum (the table's `pin`), the tiny
    model's seed, or the hub name."""
    if name in EMBEDDED_MODEL_TABLE:
        return f"{name}@{EMBEDDED_MODEL_TABLE[name].pin}"
    return f"{name}@seed{seed}" if name == TINY_MODEL else name


@dataclass
class ActivationStore:
    """A finished store on disk.  Read tensors with `load(name)`; names are hooks, 'loss',
    'grad/<hook>', 'tokens' (the token at each kept position), 'context' and 'position'."""

    root: Path
    manifest: dict = field(repr=False)

    @property
    def spec(self) -> ActivationSpec:
        return ActivationSpec(**self.manifest["spec"])

    @property
    def shards(self) -> list[Path]:
        return [self.root / s["file"] for s in self.manifest["shards"]]

    def load(self, name: str, dtype: torch.dtype | None = None, max_tokens: int | None = None) -> Tensor:
        """Concatenate tensor `name` over shards -> [n_tokens, ...] (cut to spec.n_tokens)."""
        names = self.manifest["tensors"]
        if name not in names:
            raise KeyError(f"tensor {name!r} not in store {self.root.name}; it has {names}")
        limit = min(self.spec.n_tokens, max_tokens or self.spec.n_tokens)
        parts, n = [], 0
        for path in self.shards:
            with safe_open(path, "pt") as f:  # reads only this tensor of the shard
                t = f.get_tensor(name)
            parts.append(t if dtype is None else t.to(dtype))
            n += len(t)
            if n >= limit:
                break
        return torch.cat(parts)[:limit]

    def contexts(self) -> Tensor:
        """The token contexts whose kept tokens are all in the store -> LongTensor [n, ctx_len].

        Kept token t of the store sits at contexts[context[t], position[t]]; running the model on
        these (e.g. to splice an SAE in, `splice.spliced_losses`) sees exactly the stored tokens.
        A last context that the store's n_tokens cuts short is left out.
        """
        path = self.root / CONTEXTS_FILE
        if self.manifest.get("contexts_sha256") != (sha256_file(path) if path.exists() else None):
            raise ValueError(f"{path} is missing or does not match the store's manifest; "
                             f"delete {self.root} to rebuild the store")
        return load_file(path)["contexts"][: self.spec.n_tokens // self.spec.kept_per_context]


def _shard_ok(path: Path) -> bool:
    """A shard is finished iff its sidecar exists and the file's sha256 matches it."""
    side = path.with_suffix(".json")
    if not (path.exists() and side.exists()):
        return False
    try:
        return json.loads(side.read_text())["sha256"] == sha256_file(path, memo=True)
    except (ValueError, KeyError):
        return False


def _forward(model: HookedTransformer, tokens: Tensor, spec: ActivationSpec) -> dict[str, Tensor]:
    """One batch of contexts -> {hook: [b, kept, d], 'loss': [b, kept], 'grad/<hook>': ...}."""
    keep = slice(spec.drop_first, spec.ctx_len - 1)
    acts: dict[str, Tensor] = {}

    def grab(act: Tensor, hook) -> Tensor:
        acts[hook.name] = act
        return act

    hooks = [(h, grab) for h in spec.hooks]
    first = min(parse_hook(model, h) for h in spec.hooks)
    if spec.with_grad:
        # A leaf at the first hooked block's input puts every hooked activation in the graph, and
        # only from there on: the earlier layers run without building one (weights are frozen).
        hooks.insert(0, (f"blocks.{first}.hook_resid_pre",
                         lambda act, hook: act.detach().requires_grad_(True)))
    stop = None
    if not (spec.with_loss or spec.with_grad):  # nothing needs the later layers
        stop = max(parse_hook(model, h) for h in spec.hooks) + 1
    with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=spec.autocast_bf16), \
            torch.set_grad_enabled(spec.with_grad):
        out = model.run_with_hooks(tokens, fwd_hooks=hooks, stop_at_layer=stop,
                                   return_type="logits" if stop is None else None)
        result: dict[str, Tensor] = {}
        if stop is None:
            logits = out[:, :-1].float()
            loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(),
                                   reduction="none").view(logits.shape[:2])  # [b, ctx-1]
            result["loss"] = loss[:, keep].detach()
            if spec.with_grad:
                grads = torch.autograd.grad(loss.sum(), [acts[h] for h in spec.hooks])
                for h, g in zip(spec.hooks, grads):
                    result[f"grad/{h}"] = g[:, keep].detach()
    for h in spec.hooks:
        result[h] = acts[h][:, keep].detach()
    return result


def _write_shard(model: HookedTransformer, ctx: Tensor, start: int, spec: ActivationSpec,
                 path: Path) -> None:
    """Run contexts `ctx` [n, ctx_len] (global offset `start`) and write one shard atomically."""
    dtype = _DTYPES[spec.dtype]
    parts: dict[str, list[Tensor]] = {}
    for i in range(0, len(ctx), spec.batch_contexts):
        batch = ctx[i: i + spec.batch_contexts].to(spec.device)
        for name, t in _forward(model, batch, spec).items():
            parts.setdefault(name, []).append(t.flatten(0, 1).cpu())
    kept = spec.kept_per_context
    out = {k: torch.cat(v).to(dtype if k != "loss" else torch.float32) for k, v in parts.items()}
    out["tokens"] = ctx[:, spec.drop_first: spec.ctx_len - 1].flatten()
    out["context"] = (torch.arange(len(ctx)) + start).repeat_interleave(kept)
    out["position"] = torch.arange(spec.drop_first, spec.ctx_len - 1).repeat(len(ctx))
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in out.items()}, tmp)
    # memo: the notebook's record_input verifies the new store right after; it need not reread it
    write_json(path.with_suffix(".json"), {"sha256": sha256_file(path, memo=True), "n_tokens": len(out["tokens"])})


def _tokenized(spec: ActivationSpec, corpus: Corpus, tokenizer) -> Tensor:
    """All contexts of the split, tokenized once and cached (tokenizing 2M tokens takes a while)."""
    key = hash_inputs({"corpus": corpus.fingerprint(), "split": spec.split, "ctx_len": spec.ctx_len,
                       "model": model_identity(spec.model, spec.seed)})
    path = cache_dir() / "tokens" / f"{key}.safetensors"
    if path.exists():
        problem = file_problem(path)
        if problem is None:
            return load_file(path)["contexts"]
        warnings.warn(f"tokens cache: {problem}; rebuilding it")
        path.unlink()
    ctx = tokenize_contexts(corpus.split(spec.split), tokenizer, spec.ctx_len)
    with atomic_path(path) as tmp:
        save_file({"contexts": ctx.contiguous()}, tmp)
    write_file_checksum(path)
    return ctx


def _contexts(spec: ActivationSpec, corpus: Corpus, tokenizer) -> Tensor:
    """The spec's contexts, shuffled by seed -> [n_contexts, ctx_len]."""
    all_ctx = _tokenized(spec, corpus, tokenizer)
    if spec.skip_contexts + spec.n_contexts > len(all_ctx):
        raise ValueError(
            f"n_tokens={spec.n_tokens} needs {spec.n_contexts} contexts of {spec.ctx_len} tokens after "
            f"skip_contexts={spec.skip_contexts} but the {spec.split} split of {spec.corpus!r} has "
            f"{len(all_ctx)} (at most {len(all_ctx) * spec.kept_per_context} kept tokens)")
    order = torch.randperm(len(all_ctx), generator=torch.Generator().manual_seed(spec.seed))
    return all_ctx[order[spec.skip_contexts: spec.skip_contexts + spec.n_contexts]]


def store_key(spec: ActivationSpec, corpus_hash: str) -> str:
    fields = asdict(spec)
    if not fields["skip_contexts"]:  # stores from before the field keep their keys
        del fields["skip_contexts"]
    return hash_inputs({"format": FORMAT_VERSION, "spec": fields, "corpus": corpus_hash,
                        "model": model_identity(spec.model, spec.seed)})


@timed("collection")
def collect(spec: ActivationSpec, model: HookedTransformer | None = None,
            progress: bool = True) -> ActivationStore:
    """Return the store for `spec`, computing only the shards that are missing or corrupt."""
    corpus = load_corpus(spec.corpus)
    corpus_hash = corpus.fingerprint()
    root = cache_dir() / "activations" / store_key(spec, corpus_hash)
    manifest_path = root / "manifest.json"
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text())
        except ValueError:  # bad JSON or not even UTF-8
            warnings.warn(f"activation store: {manifest_path} is unreadable (truncated?); rebuilding "
                          f"the store (shards that still match their checksums are kept)")
            manifest = {"shards": []}
        ctx_file = root / CONTEXTS_FILE
        bad = [s["file"] for s in manifest["shards"] if not _shard_ok(root / s["file"])]
        if manifest["shards"] and not bad and ctx_file.exists() \
                and manifest.get("contexts_sha256") == sha256_file(ctx_file, memo=True):
            return ActivationStore(root, manifest)
        if bad:
            warnings.warn(f"activation store {root}: {len(bad)} shard(s) damaged or missing "
                          f"({', '.join(bad[:3])}); recomputing them")
    model = model if model is not None else load_model(spec.model, seed=spec.seed, device=spec.device)
    for h in spec.hooks:
        parse_hook(model, h)  # clear error listing valid hooks before any work
    contexts = _contexts(spec, corpus, model.tokenizer)
    root.mkdir(parents=True, exist_ok=True)
    with atomic_path(root / CONTEXTS_FILE) as tmp:
        save_file({"contexts": contexts.contiguous()}, tmp)
    n_shards = math.ceil(len(contexts) / spec.contexts_per_shard)
    shards = []
    report = Progress(f"activations {spec.model} {spec.split} ({spec.n_tokens} tokens): shard", n_shards)
    for i in tqdm(range(n_shards), desc=f"activations {spec.model} {spec.split}", disable=not progress):
        path = root / f"shard_{i:05d}.safetensors"
        start = i * spec.contexts_per_shard
        if not _shard_ok(path):
            _write_shard(model, contexts[start: start + spec.contexts_per_shard], start, spec, path)
        report.update(i + 1)
        shards.append({"file": path.name, **json.loads(path.with_suffix(".json").read_text())})
    tensors = list(spec.hooks) + ["tokens", "context", "position"]
    tensors += ["loss"] if spec.with_loss or spec.with_grad else []
    tensors += [f"grad/{h}" for h in spec.hooks] if spec.with_grad else []
    manifest = {"spec": asdict(spec), "model": model_identity(spec.model, spec.seed),
                "corpus_hash": corpus_hash, "d_model": model.cfg.d_model,
                "positions": [spec.drop_first, spec.ctx_len - 1], "dtype": spec.dtype,
                "tensors": tensors, "shards": shards, "format": FORMAT_VERSION,
                "contexts_sha256": sha256_file(root / CONTEXTS_FILE)}
    write_json(manifest_path, manifest)
    return ActivationStore(root, manifest)
