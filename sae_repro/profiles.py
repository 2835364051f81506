"""Named profiles: one table of parameters, read by every notebook.

A notebook's `parameters` cell names the parameters it reads, with the `default` profile's values;
the pipeline injects the chosen profile's values for those names. `ci` runs every notebook end to
end on the tiny random model in seconds; `quick` and `default` run on the embedded SmolLM2-135M
on a 2-core CPU; `full` is for a GPU and hub models (GPT-2 small with its pretrained SAEs).
"""

from __future__ import annotations

from typing import Any

PROFILE_NAMES = ("ci", "quick", "default", "full")

# parameter -> value per profile, in PROFILE_NAMES order.
_TABLE: dict[str, tuple[Any, Any, Any, Any]] = {
    "seed": (0, 0, 0, 0),
    "device": ("cpu", "cpu", "cpu", "cuda"),
    "model": ("tiny-random", "smollm2-135m", "smollm2-135m", "gpt2"),
    "corpus": ("gutenberg-shakespeare", "gutenberg-shakespeare", "gutenberg-shakespeare",
               "NeelNanda/pile-10k"),
    "ctx_len": (64, 128, 128, 1024),
    "drop_first": (2, 4, 4, 4),
    "layers": ((0, 1), (5, 15, 25), (5, 15, 25), (3, 6, 9)),
    # model and data chapter
    "mad_n_tokens": (2_000, 10_000, 25_000, 100_000),
    # synthetic check of the Dark Matter paper
    "syn_n_tokens": (3_000, 20_000, 40_000, 200_000),
    "syn_d_model": (32, 64, 128, 256),
    "syn_n_features": (256, 1_024, 2_048, 8_192),
    "syn_avg_active": (8, 16, 24, 32),
    # noise scales relative to the activations' RMS norm; activation noise can only be recovered
    # linearly where it dominates x, so the grid must reach past 1 (see sae_repro.synthetic)
    "syn_noise_scales": ((0.0, 1.0, 2.0), (0.0, 0.5, 1.0, 2.0), (0.0, 0.5, 1.0, 1.5, 2.0),
                         (0.0, 0.5, 1.0, 1.5, 2.0)),
}


def profile(name: str) -> dict[str, Any]:
    """All parameters of profile `name`."""
    if name not in PROFILE_NAMES:
        raise ValueError(f"unknown profile={name!r}: expected one of {PROFILE_NAMES}")
    i = PROFILE_NAMES.index(name)
    return {k: (list(v[i]) if isinstance(v[i], tuple) else v[i]) for k, v in _TABLE.items()}


def parameters_for(name: str, wanted: list[str]) -> dict[str, Any]:
    """The profile's values for the parameters a notebook declares (others keep the notebook's)."""
    values = profile(name)
    return {k: values[k] for k in wanted if k in values} | {"profile": name}
