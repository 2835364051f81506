"""The SAELens on-disk format and conversion both ways: our SAEs load in SAELens, theirs here.

On disk an SAE is a SAELens folder: `cfg.json` + `sae_weights.safetensors`. The rule maps to the
SAELens architecture that reproduces our *inference* output (`SAELENS_ARCHITECTURE`: batch rules
become JumpReLU with their learned thresholds, i.e. the `inference="threshold"` output; SAELens
has no inference-time batch rule, and its BatchTopK is saved as JumpReLU too); our own fields
live in `cfg.json["metadata"]["sae_repro"]`, which SAELens keeps but ignores (its weight loader
is strict, so no extra tensors go in the weights file; the ThresholdEMA state is recovered from
the jumprelu `threshold`: a latent has been seen iff its threshold is finite).

    save(sae, "out")  ->  sae_lens.SAE.load_from_disk("out")   (identical outputs, tests/test_sae.py)
    load("out"), from_sae_lens(their_sae), load_pretrained("release:sae_id")
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, fields
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from sae_repro.cache import atomic_path
from sae_repro.sae import BATCH_RULES, SAEConfig, SparseAutoencoder

FORMAT_VERSION = 1
CFG_FILENAME, WEIGHTS_FILENAME = "cfg.json", "sae_weights.safetensors"
# our rule -> the SAELens architecture with the same inference output
SAELENS_ARCHITECTURE = {
    "topk": "topk",
    "gradient_topk": "topk",  # without a gradient the g-SAE score is pre: plain TopK
    "mutual_choice": "jumprelu",  # threshold_select(pre, EMA threshold) == JumpReLU
    "feature_choice": "jumprelu",  # per-latent EMA thresholds
    "jumprelu": "jumprelu",
    "relu": "standard",
}
_SAELENS_TO_RULE = {"topk": "topk", "jumprelu": "jumprelu", "standard": "relu"}


def to_sae_lens_dict(sae: SparseAutoencoder) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(cfg.json dict, weights) in the SAELens 6.x format; see SAELENS_ARCHITECTURE."""
    cfg = sae.cfg
    arch = SAELENS_ARCHITECTURE[cfg.rule]
    try:
        version = importlib_metadata.version("sae-lens")
    except importlib_metadata.PackageNotFoundError:
        version = "6.0.0"
    meta: dict[str, Any] = {"sae_lens_version": version, "sae_lens_training_version": version,
                            "sae_repro": {**asdict(cfg), "format_version": FORMAT_VERSION}}
    if cfg.hook_name is not None:
        meta["hook_name"] = cfg.hook_name
    if cfg.model_name is not None:
        meta["model_name"] = cfg.model_name
    out: dict[str, Any] = {
        "architecture": arch, "d_in": cfg.d_in, "d_sae": cfg.n_latents, "dtype": "float32",
        "device": "cpu", "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": "none", "reshape_activations": "none", "metadata": meta,
    }
    weights = {name: getattr(sae, name).detach().float().contiguous().cpu()
               for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if arch == "topk":
        out.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    elif cfg.rule == "jumprelu":
        weights["threshold"] = sae.threshold.detach().float().clone()
    elif arch == "jumprelu":  # batch rule: its inference threshold (inf = never fired)
        weights["threshold"] = sae.ema.threshold.detach().float().expand(cfg.n_latents).clone()
    return out, weights


def _config_from_sae_lens(cfg_dict: dict[str, Any]) -> SAEConfig:
    """Our config of a SAELens cfg dict: ours verbatim if we saved it, else mapped from theirs."""
    meta = cfg_dict.get("metadata") or {}
    ours = meta.get("sae_repro") if isinstance(meta, dict) else None
    if ours is not None:
        return SAEConfig(**{f.name: ours[f.name] for f in fields(SAEConfig) if f.name in ours})
    arch = cfg_dict.get("architecture", "standard")
    if arch not in _SAELENS_TO_RULE:
        raise ValueError(f"from_sae_lens: architecture={arch!r} is not supported; supported: "
                         f"{', '.join(sorted(_SAELENS_TO_RULE))}")
    for flag, ok in [("normalize_activations", "none"), ("reshape_activations", "none")]:
        if cfg_dict.get(flag, ok) != ok:
            raise ValueError(f"from_sae_lens: {flag}={cfg_dict[flag]!r} is not supported; only {ok!r}")
    if cfg_dict.get("finetuning_scaling_factor"):
        raise ValueError("from_sae_lens: finetuning_scaling_factor=True is not supported")
    return SAEConfig(
        d_in=int(cfg_dict["d_in"]), n_latents=int(cfg_dict["d_sae"]), rule=_SAELENS_TO_RULE[arch],
        k=int(cfg_dict.get("k", 1)) if arch == "topk" else 1,
        apply_b_dec_to_input=bool(cfg_dict.get("apply_b_dec_to_input", True)),
        normalize_decoder=False,  # keep the loaded decoder as it is
        hook_name=meta.get("hook_name"), model_name=meta.get("model_name"))


def from_sae_lens_dict(cfg_dict: dict[str, Any], weights: dict[str, Tensor]) -> SparseAutoencoder:
    """Build from a SAELens cfg dict + state dict, folding flags we do not keep as such."""
    cfg = _config_from_sae_lens(cfg_dict)
    ours = isinstance(cfg_dict.get("metadata"), dict) and "sae_repro" in cfg_dict["metadata"]
    sae = SparseAutoencoder(cfg)
    w = {k: v.float() for k, v in weights.items()}
    expected = {"W_enc": (cfg.d_in, cfg.n_latents), "b_enc": (cfg.n_latents,),
                "W_dec": (cfg.n_latents, cfg.d_in), "b_dec": (cfg.d_in,)}
    if cfg.rule == "jumprelu":
        expected["threshold"] = (cfg.n_latents,)
    for name, shape in expected.items():
        if name not in w or tuple(w[name].shape) != shape:
            got = tuple(w[name].shape) if name in w else "missing"
            raise ValueError(f"from_sae_lens: weight {name} must have shape {shape}, got {got}")
    if cfg_dict.get("architecture") == "topk" and not ours and cfg_dict.get("rescale_acts_by_decoder_norm", False):
        # SAELens selects on pre * |W_dec row| and decodes codes / |W_dec row|: fold the norms
        norm = w["W_dec"].norm(dim=1)
        w["W_enc"], w["b_enc"], w["W_dec"] = w["W_enc"] * norm, w["b_enc"] * norm, w["W_dec"] / norm[:, None]
    with torch.no_grad():
        for name in expected:
            getattr(sae, name).copy_(w[name])
        if cfg.rule in BATCH_RULES and "threshold" in w:
            thr = w["threshold"] if sae.ema.per_latent else w["threshold"][0]
            sae.ema.threshold.copy_(thr)
            sae.ema.seen.copy_(torch.isfinite(thr))
    return sae.eval()


def save(sae: SparseAutoencoder, path: str | Path) -> Path:
    """Write the SAELens folder `path` (cfg.json + sae_weights.safetensors) atomically."""
    cfg_dict, weights = to_sae_lens_dict(sae)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.mkdir()
        save_file(weights, tmp / WEIGHTS_FILENAME)
        (tmp / CFG_FILENAME).write_text(json.dumps(cfg_dict, indent=2))
    return path


def load(path: str | Path) -> SparseAutoencoder:
    """Load a folder written by `save` or by SAELens (`save_model`); returns it in eval mode."""
    path = Path(path)
    if not (path / CFG_FILENAME).exists() or not (path / WEIGHTS_FILENAME).exists():
        raise ValueError(f"load: {path} is not an SAE folder; expected {CFG_FILENAME} and {WEIGHTS_FILENAME} in it")
    cfg_dict = json.loads((path / CFG_FILENAME).read_text())
    return from_sae_lens_dict(cfg_dict, load_file(path / WEIGHTS_FILENAME))


def from_sae_lens(sae_or_path: Any) -> SparseAutoencoder:
    """An SAELens SAE object (TopKSAE, JumpReLUSAE, StandardSAE) or a folder it saved -> ours."""
    if isinstance(sae_or_path, (str, Path)):
        return load(sae_or_path)
    if not hasattr(sae_or_path, "cfg") or not hasattr(sae_or_path.cfg, "to_dict"):
        raise ValueError(f"from_sae_lens: expected a sae_lens SAE or a folder path, "
                         f"got {type(sae_or_path).__name__}")
    state = {k: v.detach().cpu() for k, v in sae_or_path.state_dict().items()}
    return from_sae_lens_dict(sae_or_path.cfg.to_dict(), state)


def to_sae_lens(sae: SparseAutoencoder):
    """`sae` as a sae_lens SAE object (via a temporary SAELens folder)."""
    from sae_lens import SAE  # lazy: importing sae_lens costs ~10 s

    with tempfile.TemporaryDirectory() as tmp:
        return SAE.load_from_disk(save(sae, Path(tmp) / "sae"))


def load_pretrained(spec: str, device: str = "cpu") -> SparseAutoencoder:
    """An SAE trained elsewhere, in eval mode: a folder in the SAELens format, or
    "release:sae_id" from SAELens's registry of pretrained SAEs (which downloads from the model
    hub: for users online), e.g. "gpt2-small-res-jb:blocks.7.hook_resid_pre". Architectures and
    input normalisations we do not support raise a ValueError naming them."""
    path = Path(spec)
    if path.is_dir():
        return load(path).to(device)
    if ":" not in spec:
        raise ValueError(f"pretrained SAE {spec!r}: expected a folder in the SAELens format or "
                         f"'release:sae_id' such as 'gpt2-small-res-jb:blocks.7.hook_resid_pre'")
    from sae_lens import SAE  # lazy: importing sae_lens costs ~10 s

    release, sae_id = spec.split(":", 1)
    return from_sae_lens(SAE.from_pretrained(release, sae_id, device="cpu")).to(device)
