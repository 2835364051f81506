"""Named profiles: each profile's parameters in one dict, read by every notebook, and their rules.

A notebook's `parameters` cell names the parameters it reads, with the `default` profile's values;
the pipeline injects the chosen profile's values for those names. `ci` runs every notebook end to
end on the tiny random model in seconds; `quick` (a preview: ~9 minutes cold on 2 AVX2 cores, small
stores, fewer variants) and `default` (the committed figures) run on the embedded SmolLM2-135M on a
2-core CPU; `full` is for a GPU and hub models (GPT-2 small with its pretrained SAEs).

Every value, from the table or from a `-p NAME VALUE` override, is checked before a kernel starts:
its type against the notebook's default (`check_parameter`) and its range against `RULES`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

PROFILE_NAMES = ("ci", "quick", "default", "full")

# Each profile in full, one dict each; the comments on what a parameter means and why it has its
# value are on the `default` profile. tests/test_pipeline.py checks that every profile sets the
# same parameters.

# `ci`: every notebook end to end on the tiny random model, in a few minutes on 2 cores.
CI: dict[str, Any] = {
    "seed": 0,
    "device": "cpu",
    "model": "tiny-random",
    "corpus": "gutenberg-shakespeare",
    "ctx_len": 64,
    "drop_first": 2,
    "layers": [0, 1],
    "sae_layer": 1,
    "bf16": "auto",
    "pretrained_saes": [],
    "mad_n_tokens": 2000,
    "zoo_n_train": 4096,
    "zoo_n_test": 1024,
    "zoo_batch_size": 512,
    "zoo_epochs": 2.0,
    "zoo_beta": 3.0,
    "main_expansion": 4,
    "main_k": 8,
    "an_n_train": 4096,
    "an_n_test": 2048,
    "sae_dead_window_tokens": 2048,
    "sae_lr": 0.003,
    "sae_batch_size": 256,
    "sae_epochs": 2.0,
    "main_epochs": 2.0,
    "sae_ladder": [0.25, 0.5],
    "ce_n_contexts": 4,
    "dm_ce_n_contexts": 4,
    "dm_expansions": [2, 4, 8],
    "jr_expansions": [2, 4, 8],
    "dm_ks": [4, 8],
    "dm_layer_expansions": [2, 8],
    "dm_error_ks": [4, 8],
    "dm_error_n_train": 2048,
    "dm_pursuit_n_tokens": 512,
    "mc_ks": [4, 8],
    "mc_finetune_fraction": 0.25,
    "gsae_ks": [4, 8],
    "gsae_betas": [3.0, 30.0],
    "steer_n_latents": 4,
    "steer_n_contexts": 2,
    "steer_ctx_len": 16,
    "steer_scale": 0.25,
    "steer_scales": [0.25, 1.0],
    "cards_n_latents": 3,
    "cards_n_top": 10,
    "tv_n_contexts": 2,
    "cross_seeds": 2,  # two seeds: the Welch interval path runs in CI
    "syn_n_tokens": 3000,
    "syn_d_model": 32,
    "syn_n_features": 256,
    "syn_avg_active": 8,
    "syn_noise_scales": [0.0, 1.0, 2.0],
}

# `quick`: a preview on the embedded SmolLM2-135M (~9 minutes cold on 2 AVX2 cores).
QUICK: dict[str, Any] = {
    "seed": 0,
    "device": "cpu",
    "model": "smollm2-135m",
    "corpus": "gutenberg-shakespeare",
    "ctx_len": 128,
    "drop_first": 4,
    "layers": [5, 15, 25],
    "sae_layer": 15,
    "bf16": "auto",
    "pretrained_saes": [],
    "mad_n_tokens": 5000,
    "zoo_n_train": 10_000,
    "zoo_n_test": 4096,
    "zoo_batch_size": 1024,
    "zoo_epochs": 4.0,
    "zoo_beta": 3.0,
    "main_expansion": 8,
    "main_k": 32,
    "an_n_train": 12_000,
    "an_n_test": 8192,
    "sae_dead_window_tokens": 10_000,
    "sae_lr": 0.003,
    "sae_batch_size": 512,
    "sae_epochs": 2.0,
    "main_epochs": 2.0,
    "sae_ladder": [0.1, 0.3],  # the cheapest 10x ladder (+8% steps): quick stays within 10 minutes
    "ce_n_contexts": 8,
    "dm_ce_n_contexts": 16,
    "dm_expansions": [2, 4, 8],
    "jr_expansions": [2, 4, 8],
    "dm_ks": [16, 32],
    "dm_layer_expansions": [2, 8],
    "dm_error_ks": [16, 32],
    "dm_error_n_train": 10_000,
    "dm_pursuit_n_tokens": 2048,
    "mc_ks": [16, 32],
    "mc_finetune_fraction": 0.25,
    "gsae_ks": [16, 32],
    "gsae_betas": [3.0, 30.0],
    "steer_n_latents": 16,
    "steer_n_contexts": 4,
    "steer_ctx_len": 32,
    "steer_scale": 0.25,
    "steer_scales": [0.125, 0.25, 0.5],
    "cards_n_latents": 8,
    "cards_n_top": 20,
    "tv_n_contexts": 4,
    "cross_seeds": 1,
    "syn_n_tokens": 20_000,
    "syn_d_model": 64,
    "syn_n_features": 1024,
    "syn_avg_active": 16,
    "syn_noise_scales": [0.0, 0.5, 1.0, 2.0],
}

# `default`: the committed figures, on SmolLM2-135M (cold on 2 AVX2 cores: see the Reproducibility page).
DEFAULT: dict[str, Any] = {
    "seed": 0,
    "device": "cpu",
    "model": "smollm2-135m",
    "corpus": "gutenberg-shakespeare",
    "ctx_len": 128,
    "drop_first": 4,
    "layers": [5, 15, 25],
    # the layer whose residual stream (blocks.L.hook_resid_post) the SAE chapters study
    "sae_layer": 15,
    # float32 everywhere: "auto" (bf16 where the hardware has it, sae_repro.precision) would make
    # the same profile and seed give different figure data on an AMX Xeon and an AVX2-only EPYC;
    # the committed figures are float32. Pass `-p bf16 auto` for speed on such a machine.
    "bf16": False,
    # SAEs trained elsewhere at that hook, analysed beside ours by the Dark Matter chapter:
    # "release:sae_id" from SAELens's registry (hub: `full` only) or a SAELens folder
    "pretrained_saes": [],
    # model and data chapter
    "mad_n_tokens": 25_000,
    # the SAE zoo: TopK, Mutual Choice, Feature Choice, g-SAE on one store (with gradients)
    # gradients need a backward pass (~230 tokens/s on 2 AVX2 cores in fp32), so the CPU stores
    # are small; the zoo, g-SAE and cross-paper chapters train 16 SAEs on them under `default`
    "zoo_n_train": 60_000,
    "zoo_n_test": 24_576,  # also the cross-paper regressions' tokens
    # 60k tokens in batches of 4096 are only ~70 Adam steps (test FVU 0.43 at k=32); batches of
    # 1024 over 10 epochs gave 0.25 on the same data, 512 gave 0.22 (slower, mild overfitting);
    # 4 epochs keeps the default profile within its 60-minute budget on 2 AVX2 cores (6 epochs:
    # held-out FVU 0.187 at k=32, and ~68 min for the whole profile)
    "zoo_batch_size": 1024,
    "zoo_epochs": 4.0,
    # g-SAE: score = z (1 + beta |W_dec grad_x L|). beta is not scale-free: with our gradient
    # (d of the context's summed next-token loss) the median |W_dec grad| at layer 15 of SmolLM2
    # is 0.006 (p99 0.046), so beta = 1 left 77% of tokens' selections unchanged from TopK and
    # beta = 100 changed 99.6% of them. The default sweep (1..300, k 32) found CE recovered and KL
    # best at beta 1-3 and beta 30 costing FVU and KL, so the chapters compare at beta = 3, where
    # the gradient changes about half of the held-out tokens' selections
    "zoo_beta": 3.0,
    # the main SAE of every chapter: width = main_expansion * d_model, k = main_k
    "main_expansion": 8,
    "main_k": 32,
    # analysis stores (no gradients; sae_repro.experiments): Dark Matter and Mutual Choice chapters
    # (440k training tokens: ~22 minutes to collect on 2 AVX2 cores, 3 GB on disk)
    "an_n_train": 440_000,
    "an_n_test": 40_000,
    # a latent that has not fired for this many training tokens is dead and AuxK trains it; it
    # must be well below the tokens a run sees (OpenAI / sparsify use 10M of ~billions)
    "sae_dead_window_tokens": 50_000,
    # Adam's learning rate of every chapter's SAEs. sparsify's 2e-4 / sqrt(n_latents / 2^14) is
    # meant for ~1e9 tokens; with the few hundred steps a CPU affords it left wide SAEs far from
    # converged (held-out FVU 0.39 at 18432 latents vs 0.26 at 1152, k 32, 300k tokens); a
    # constant 3e-3 gave 0.21 / 0.19 / 0.185 at 1152 / 4608 / 18432 latents (6e-3: a quarter of
    # the latents dead at 4608)
    "sae_lr": 0.003,
    # SAEs trained on the analysis store: sae_epochs for every SAE (1 epoch = 859 Adam steps), and
    # main_epochs for the main SAE and the Dark Matter width sweep at main_k (2,148 steps: the
    # evidence needs them converged; 110k tokens x 2 epochs = 214 steps left the held-out FVU
    # falling). Batches of 512 buy those steps at ~0.55-0.65x the cost of 1024's (a step with 30%
    # of the latents dead: 50 / 77 / 284 ms at 2x / 8x / 32x, fp32, 2 cores of an AMD EPYC with
    # AVX512-BF16; 95 / 125 / 438 ms at 1024)
    "sae_batch_size": 512,
    "sae_epochs": 1.0,
    "main_epochs": 2.5,
    # the budget ladder: every SAE also yields the SAEs that runs of these shares of its steps end
    # with (train_sae: warmup-stable-decay branches, ~17% more steps), 4 budgets spanning 10x
    "sae_ladder": [0.1, 0.25, 0.5],
    # held-out contexts through which spliced SAEs are scored (CE loss recovered, KL)
    "ce_n_contexts": 32,
    # ... and through which the Dark Matter downstream shares are measured (their intervals
    # resample these contexts; the rest of the test store fits the LinearError maps)
    "dm_ce_n_contexts": 128,
    # Dark Matter: width sweep (expansion factors of d_model; main_expansion among them) at
    # several k (main_k among them), at sae_layer
    "dm_expansions": [2, 4, 8, 16, 32],
    # JumpReLU SAEs beside TopK (dark_matter_jumprelu): widths, at target L0 main_k (up to 16x, an
    # 8x span, as the per-layer chapter: the 32x pair would add ~30 min on 2 AVX2 cores)
    "jr_expansions": [2, 4, 8, 16],
    "dm_ks": [16, 32, 64],
    # the same headline numbers at every layer of `layers`, on fewer widths (default: up to 16x,
    # an 8x span; 32x at two more layers cost ~5 min of the 60-min budget on 2 AVX2 cores)
    "dm_layer_expansions": [2, 8, 16],
    # SAEs trained on the linear / nonlinear part of another SAE's error
    "dm_error_ks": [8, 16, 32, 64],
    # ... on the parts computed on this many training-split tokens that the main SAE never saw
    # (the authors: "fresh tokens"; ~3 minutes to collect at layer 15 on 2 AVX2 cores)
    "dm_error_n_train": 110_000,
    # held-out tokens that gradient pursuit re-encodes (it is dense: O(steps * n * width * d))
    "dm_pursuit_n_tokens": 16_000,
    # Mutual / Feature Choice chapter (analysis store, main_expansion)
    "mc_ks": [16, 32, 64],
    "mc_finetune_fraction": 0.25,  # Feature Choice fine-tune: share of steps
    # g-SAE chapter (gradient store, the zoo's training settings)
    "gsae_ks": [16, 32, 64],
    "gsae_betas": [1.0, 3.0, 10.0, 30.0, 100.0, 300.0],
    # steering: live latents per SAE (each paired with a random direction of the same norm),
    # unrelated contexts and their length (256 latents x 3 SAE groups x 3 scales on 4 contexts
    # of 32 tokens: ~2,300 passes through the blocks after the hook)
    "steer_n_latents": 256,
    "steer_n_contexts": 4,
    "steer_ctx_len": 32,
    # added norm / median token norm: at 1.0 every direction, random ones included, moved the
    # output by the same ~3.5 nats (saturated); a quarter stays where directions differ. The
    # latent cards steer at steer_scale, the g-SAE chapter's paired sweep at each of steer_scales
    "steer_scale": 0.25,
    "steer_scales": [0.125, 0.25, 0.5],
    # latent cards and token views (the Reading the latents chapter): latents per SAE type,
    # top held-out activations per latent (the proxy is scored on latents firing at least this
    # often), held-out contexts in the token views
    "cards_n_latents": 16,
    "cards_n_top": 20,
    "tv_n_contexts": 8,
    # cross-paper chapter: training seeds per SAE type (an effect is one whose Welch 95% interval
    # over seeds excludes 0: 3 seeds at least; ~35 s per SAE on 2 AVX2 cores)
    "cross_seeds": 3,
    # synthetic check of the Dark Matter paper
    "syn_n_tokens": 40_000,
    "syn_d_model": 128,
    "syn_n_features": 2048,
    "syn_avg_active": 24,
    # noise scales relative to the activations' RMS norm; activation noise can only be recovered
    # linearly where it dominates x, so the grid must reach past 1 (see sae_repro.synthetic)
    "syn_noise_scales": [0.0, 0.5, 1.0, 1.5, 2.0],
}

# `full`: for a GPU and hub models (GPT-2 small with its pretrained SAEs).
FULL: dict[str, Any] = {
    "seed": 0,
    "device": "cuda",
    "model": "gpt2",
    "corpus": "NeelNanda/pile-10k",
    "ctx_len": 1024,
    "drop_first": 4,
    "layers": [3, 6, 9],
    "sae_layer": 6,
    "bf16": "auto",
    "pretrained_saes": ["gpt2-small-res-jb:blocks.7.hook_resid_pre",
                        "gpt2-small-resid-post-v5-32k:blocks.6.hook_resid_post",
                        "gpt2-small-resid-post-v5-128k:blocks.6.hook_resid_post"],
    "mad_n_tokens": 100_000,
    "zoo_n_train": 2_000_000,
    "zoo_n_test": 100_000,
    "zoo_batch_size": 4096,
    "zoo_epochs": 1.0,
    "zoo_beta": 3.0,
    "main_expansion": 32,
    "main_k": 32,
    "an_n_train": 2_000_000,
    "an_n_test": 200_000,
    "sae_dead_window_tokens": 1_000_000,
    "sae_lr": 0.003,
    "sae_batch_size": 4096,
    "sae_epochs": 1.0,
    "main_epochs": 1.0,
    "sae_ladder": [0.1, 0.25, 0.5],
    "ce_n_contexts": 128,
    "dm_ce_n_contexts": 256,
    "dm_expansions": [4, 8, 16, 32, 64],
    "jr_expansions": [4, 8, 16, 32, 64],
    "dm_ks": [16, 32, 64],
    "dm_layer_expansions": [4, 16, 64],
    "dm_error_ks": [8, 16, 32, 64],
    "dm_error_n_train": 500_000,
    "dm_pursuit_n_tokens": 50_000,
    "mc_ks": [16, 32, 64],
    "mc_finetune_fraction": 0.25,
    "gsae_ks": [16, 32, 64],
    "gsae_betas": [1.0, 3.0, 10.0, 30.0, 100.0, 300.0],
    "steer_n_latents": 512,
    "steer_n_contexts": 32,
    "steer_ctx_len": 64,
    "steer_scale": 0.25,
    "steer_scales": [0.0625, 0.125, 0.25, 0.5],
    "cards_n_latents": 16,
    "cards_n_top": 20,
    "tv_n_contexts": 8,
    "cross_seeds": 3,
    "syn_n_tokens": 200_000,
    "syn_d_model": 256,
    "syn_n_features": 8192,
    "syn_avg_active": 32,
    "syn_noise_scales": [0.0, 0.5, 1.0, 1.5, 2.0],
}
PROFILES: dict[str, dict[str, Any]] = {"ci": CI, "quick": QUICK, "default": DEFAULT, "full": FULL}
PARAMETERS: tuple[str, ...] = tuple(DEFAULT)  # every profile parameter, in the table's order



@dataclass(frozen=True)
class Rule:
    """The values a parameter allows; a list is checked element by element."""

    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] | None = None

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(map(repr, self.choices))
        lo = f">= {self.min}" if self.min is not None else ""
        hi = f"<= {self.max}" if self.max is not None else ""
        return " and ".join(s for s in (lo, hi) if s) or "any value"

    def allows(self, value: Any) -> bool:
        if isinstance(value, (list, tuple)):
            return all(self.allows(v) for v in value)
        if value is None:
            return True  # "not used under this profile"; the type check decides if None is fine
        if self.choices is not None:
            return value in self.choices
        if not isinstance(value, (int, float)):
            return True  # a type error, reported by the type check
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


RULES: dict[str, Rule] = {
    "seed": Rule(min=0),
    "device": Rule(choices=("cpu", "cuda", "mps")),
    "ctx_len": Rule(min=2),
    "drop_first": Rule(min=0),
    "layers": Rule(min=0),
    "sae_layer": Rule(min=1),  # the chapters also read the layer before it
    "zoo_n_train": Rule(min=1),
    "an_n_train": Rule(min=1),
    "an_n_test": Rule(min=1),
    "zoo_n_test": Rule(min=1),
    "zoo_batch_size": Rule(min=1),
    "zoo_epochs": Rule(min=0.01),
    "zoo_beta": Rule(min=0.0),
    "bf16": Rule(choices=(True, False, "auto")),
    "sae_batch_size": Rule(min=1),
    "sae_lr": Rule(min=1e-6, max=1.0),
    "sae_dead_window_tokens": Rule(min=1),
    "sae_epochs": Rule(min=0.01),
    "main_epochs": Rule(min=0.01),
    "sae_ladder": Rule(min=0.001, max=0.999),
    "ce_n_contexts": Rule(min=1),
    "dm_ce_n_contexts": Rule(min=2),
    "dm_expansions": Rule(min=1),
    "jr_expansions": Rule(min=1),
    "dm_ks": Rule(min=1),
    "dm_layer_expansions": Rule(min=1),
    "dm_error_ks": Rule(min=1),
    "dm_error_n_train": Rule(min=1),
    "main_expansion": Rule(min=1),
    "main_k": Rule(min=1),
    "mc_ks": Rule(min=1),
    "mc_finetune_fraction": Rule(min=0.01, max=1.0),
    "gsae_ks": Rule(min=1),
    "gsae_betas": Rule(min=0.0),
    "steer_n_latents": Rule(min=1),
    "steer_n_contexts": Rule(min=1),
    "steer_ctx_len": Rule(min=2),
    "steer_scale": Rule(min=0.0),
    "steer_scales": Rule(min=1e-6),
    "cards_n_latents": Rule(min=1),
    "cards_n_top": Rule(min=2),
    "tv_n_contexts": Rule(min=1),
    "cross_seeds": Rule(min=1),
    "syn_d_model": Rule(min=1),
    "syn_n_features": Rule(min=1),
    "syn_avg_active": Rule(min=1),
    "syn_noise_scales": Rule(min=0.0),
}
# Rules by name suffix, so that a new chapter's token counts are checked without an entry here.
_SUFFIX_RULES: dict[str, Rule] = {"n_tokens": Rule(min=1)}


def rule_for(name: str) -> Rule | None:
    if name in RULES:
        return RULES[name]
    return next((r for suffix, r in _SUFFIX_RULES.items() if name.endswith(suffix)), None)


def profile(name: str) -> dict[str, Any]:
    """All parameters of profile `name`."""
    if name not in PROFILE_NAMES:
        raise ValueError(f"unknown profile={name!r}: expected one of {PROFILE_NAMES}")
    return copy.deepcopy(PROFILES[name])  # a copy: callers may change their lists


def parameters_for(name: str, wanted: list[str]) -> dict[str, Any]:
    """The profile's values for the parameters a notebook declares (others keep the notebook's)."""
    values = profile(name)
    return {k: values[k] for k in wanted if k in values} | {"profile": name}


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (list, tuple)):
        return "list"
    return type(value).__name__


def _type_ok(value: Any, default: Any) -> bool:
    """`value` may replace `default`: same kind (an int where a float is expected is fine, a bool is
    not a number), lists element-wise against the default's first element; a None default takes
    anything."""
    if default is None:
        return True
    want, got = _kind(default), _kind(value)
    if want == "list":
        return got == "list" and (not default or all(_type_ok(v, default[0]) for v in value))
    return got == want or (want == "float" and got == "int")


# Cross-parameter rules: (parameters, test, what it means). A notebook is checked against the
# rules whose parameters it all reads, so chapters that share SAEs ask for the same ones.
_JOINT: list[tuple[tuple[str, ...], Any, str]] = [
    (("main_expansion", "dm_expansions"), lambda e, es: e in es, "main_expansion must be one of dm_expansions"),
    (("main_expansion", "jr_expansions"), lambda e, es: e in es and len(set(es)) >= 2,
     "jr_expansions must hold main_expansion and at least one other width"),
    (("jr_expansions", "dm_expansions"), lambda j, d: set(j) <= set(d),
     "jr_expansions must be among dm_expansions (its TopK SAEs are the width sweep's)"),
    (("main_k", "dm_ks"), lambda k, ks: k in ks, "main_k must be one of dm_ks"),
    (("main_k", "mc_ks"), lambda k, ks: k in ks, "main_k must be one of mc_ks"),
    (("main_k", "gsae_ks"), lambda k, ks: k in ks, "main_k must be one of gsae_ks"),
    (("zoo_beta", "gsae_betas"), lambda b, bs: b in bs, "zoo_beta must be one of gsae_betas"),
    (("an_n_train", "sae_batch_size"), lambda n, b: n >= b, "an_n_train must be >= sae_batch_size (one batch)"),
    (("an_n_test", "sae_batch_size"), lambda n, b: n >= b, "an_n_test must be >= sae_batch_size (one batch)"),
    (("dm_error_n_train", "sae_batch_size"), lambda n, b: n >= b,
     "dm_error_n_train must be >= sae_batch_size (one batch)"),
    (("zoo_n_train", "zoo_batch_size"), lambda n, b: n >= b, "zoo_n_train must be >= zoo_batch_size (one batch)"),
    (("zoo_n_test", "zoo_batch_size"), lambda n, b: n >= b, "zoo_n_test must be >= zoo_batch_size (one batch)"),
    (("drop_first", "ctx_len"), lambda d, c: d <= c - 2, "drop_first must be <= ctx_len - 2"),
    (("sae_ladder",), lambda f: list(f) == sorted(set(f)), "sae_ladder must be increasing shares of the steps"),
]


def joint_errors(params: dict[str, Any]) -> list[str]:
    """Messages for the cross-parameter rules that `params` breaks (only rules whose parameters
    are all in `params`)."""
    errors = []
    for names, ok, what in _JOINT:
        if all(n in params for n in names):
            values = [params[n] for n in names]
            try:
                good = ok(*values)
            except TypeError:  # a type error is reported by check_parameter
                continue
            if not good:
                errors.append(f"{what}; got " + ", ".join(f"{n}={v!r}" for n, v in zip(names, values)))
    return errors


# SAEs each k list trains: (k parameter, the expansions it is trained at, as a function of params)
_K_WIDTHS: list[tuple[str, Any]] = [
    ("main_k", lambda p: [p["main_expansion"]]),
    ("dm_ks", lambda p: p["dm_expansions"]),
    ("main_k", lambda p: p["dm_layer_expansions"]),
    ("main_k", lambda p: p["jr_expansions"]),  # the JumpReLU SAEs' target L0
    ("mc_ks", lambda p: [p["main_expansion"]]),
    ("gsae_ks", lambda p: [p["main_expansion"]]),
    ("dm_error_ks", lambda p: [max(1, p["main_expansion"] // 2)]),  # dark_matter_downstream's
]


def setting_errors(params: dict[str, Any]) -> list[str]:
    """Messages for the model and corpus names and, for an embedded model (whose shape is known),
    layers out of range and k larger than the narrowest SAE it is trained at."""
    from sae_repro.registry import EMBEDDED_CORPORA, EMBEDDED_MODEL_SHAPES

    errors = []
    model, corpus = params.get("model"), params.get("corpus")
    if isinstance(corpus, str) and corpus not in EMBEDDED_CORPORA and "/" not in corpus:
        errors.append(f"corpus={corpus!r}: use one of {EMBEDDED_CORPORA} or a Hugging Face dataset "
                      f"id such as 'NeelNanda/pile-10k'")
    shape = EMBEDDED_MODEL_SHAPES.get(model) if isinstance(model, str) else None
    if isinstance(model, str) and shape is None and not _hub_model_known(model):
        errors.append(f"model={model!r}: use one of the embedded {tuple(EMBEDDED_MODEL_SHAPES)} or a "
                      f"transformer_lens model name such as 'gpt2'")
    if shape is None:
        return errors
    d, n_layers = shape["d_model"], shape["n_layers"]
    for name in ("sae_layer", "layers"):
        values = params.get(name)
        values = values if isinstance(values, list) else [values] if values is not None else []
        if any(isinstance(v, int) and v >= n_layers for v in values):
            errors.append(f"{name}={params[name]!r}: {model} has layers 0..{n_layers - 1}")
    for name, widths in _K_WIDTHS:
        try:
            ks = params[name] if isinstance(params[name], list) else [params[name]]
            narrowest = min(widths(params)) * d
        except (KeyError, TypeError, ValueError):  # not this notebook's, or a type error reported elsewhere
            continue
        if ks and max(ks) > narrowest:
            errors.append(f"{name}={params[name]!r}: k={max(ks)} is more latents than the narrowest SAE "
                          f"it trains has ({narrowest} = {narrowest // d} x d_model {d} of {model})")
    return errors


def _hub_model_known(name: str) -> bool:
    """A transformer_lens model name (importing transformer_lens: only for a non-embedded model)."""
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        get_official_model_name(name)
        return True
    except ValueError:
        return False


def check_parameter(name: str, value: Any, default: Any) -> str | None:
    """None if `value` is allowed for parameter `name` (whose notebook default is `default`), else
    a message naming the parameter, the value and what is allowed."""
    rule = rule_for(name)
    if rule is not None and rule.choices is not None:  # the choices are the allowed values, any type
        return None if rule.allows(value) else f"{name}={value!r}: must be {rule.describe()}"
    if not _type_ok(value, default):
        elem = f" of {_kind(default[0])}" if isinstance(default, list) and default else ""
        return f"{name}={value!r}: expected {_kind(default)}{elem} (like the default {default!r})"
    if rule is not None and not rule.allows(value):
        return f"{name}={value!r}: must be {rule.describe()}"
    return None
