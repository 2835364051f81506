"""The activation stores and SAE configurations that the chapters share.

Every chapter builds its stores and training configs through these functions, from the same
profile parameters, so two chapters that need the same store or the same SAE ask for exactly the
same spec and hit the same content-addressed cache (`activations.collect`, `zoo.trained_sae`):
the default profile computes each once.

Two kinds of store, both of the residual stream after block `sae_layer` of one model:
- analysis stores (`analysis_stores`): no gradients, so the forward stops after the deepest
  hook. They also hold the residual stream at every layer of `layers`, the previous layer's, and
  the attention and MLP outputs of block `sae_layer` (the Dark Matter chapter's "earlier
  components"). The test split also holds the per-token loss (a norm-prediction baseline). The
  Dark Matter and Mutual Choice chapters train and measure here.
- gradient stores (`gradient_stores`): only the SAE layer, with d(loss)/dx for g-SAEs (a backward
  pass, ~2.5x the cost of a forward per token on CPU). The SAE zoo, the g-SAE chapter and the
  cross-paper chapter train and measure here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from sae_repro.activations import ActivationSpec, ActivationStore, collect
from sae_repro.train import TrainConfig

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Setting:
    """The parameters every chapter shares (a profile's values)."""

    model: str
    corpus: str
    ctx_len: int
    drop_first: int
    seed: int = 0
    device: str = "cpu"
    bf16: bool | str = "auto"
    dead_window_tokens: int = 1_000_000  # a latent silent this long is dead (AuxK trains it)
    lr: float | None = None  # Adam's learning rate; None: TrainConfig's width rule
    ladder: tuple[float, ...] = ()  # the budget ladder of every SAE (TrainConfig.ladder)

    def spec(self, **kw: Any) -> ActivationSpec:
        """An ActivationSpec of this setting (bf16 autocast of the model's forward as `bf16`)."""
        return ActivationSpec(model=self.model, corpus=self.corpus, ctx_len=self.ctx_len,
                              drop_first=self.drop_first, seed=self.seed, device=self.device,
                              autocast_bf16=self.bf16, **kw)

    def train_config(self, **kw: Any) -> TrainConfig:
        """A TrainConfig with this setting's seed, device, bf16 (encoder matmul), dead window,
        learning rate and ladder unless `kw` names them (e.g. another training seed)."""
        return TrainConfig(**({"seed": self.seed, "device": self.device, "bf16": self.bf16,
                               "dead_window_tokens": self.dead_window_tokens, "lr": self.lr,
                               "ladder": self.ladder} | kw))


def resid(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def analysis_hooks(sae_layer: int, layers: list[int] | tuple[int, ...]) -> tuple[str, ...]:
    """Residual stream at `layers`, at sae_layer and the layer before it; attention and MLP
    outputs of block sae_layer. Sorted by layer, no duplicates."""
    if sae_layer < 1:
        raise ValueError(f"sae_layer={sae_layer}: must be >= 1 (the chapters also read the layer before)")
    hooks = {resid(L) for L in layers} | {resid(sae_layer), resid(sae_layer - 1),
                                          f"blocks.{sae_layer}.hook_attn_out",
                                          f"blocks.{sae_layer}.hook_mlp_out"}
    return tuple(sorted(hooks, key=lambda h: (int(h.split(".")[1]), h)))


def analysis_stores(s: Setting, *, sae_layer: int, layers: list[int] | tuple[int, ...],
                    n_train: int, n_test: int, progress: bool = True) -> dict[str, ActivationStore]:
    """{"train": store, "test": store} of `analysis_hooks`; the test store has per-token loss."""
    hooks = analysis_hooks(sae_layer, layers)
    return {split: collect(s.spec(hooks=hooks, split=split, n_tokens=n, with_loss=split == "test"),
                           progress=progress)
            for split, n in (("train", n_train), ("test", n_test))}


def gradient_stores(s: Setting, *, sae_layer: int, n_train: int, n_test: int,
                    progress: bool = True) -> dict[str, ActivationStore]:
    """{"train": store, "test": store} of the SAE layer's residual, with loss gradients."""
    return {split: collect(s.spec(hooks=(resid(sae_layer),), split=split, n_tokens=n,
                                  with_grad=True), progress=progress)
            for split, n in (("train", n_train), ("test", n_test))}


def fresh_store(s: Setting, *, sae_layer: int, skip_tokens: int, n_tokens: int,
                progress: bool = True) -> ActivationStore:
    """Training-split tokens of the SAE layer's residual that the analysis training store of
    `skip_tokens` tokens does not hold (the contexts after its own in the same seeded order), e.g.
    to compute another SAE's error parts on tokens that SAE never saw. No loss, no gradients."""
    spec = s.spec(hooks=(resid(sae_layer),), split="train", n_tokens=n_tokens, with_loss=False)
    skip = s.spec(hooks=(resid(sae_layer),), split="train", n_tokens=skip_tokens).n_contexts
    return collect(replace(spec, skip_contexts=skip), progress=progress)
