"""A chapter: what a notebook opens once, right after its parameters cell.

    ch = Chapter.open("dark_matter_scaling", globals())   # the parameters, as papermill set them
    stores = ch.analysis_stores()                          # built, cached, recorded as inputs
    sae, history, key = ch.main_sae()                      # TopK at main_k, main width, main_epochs
    ch.figure(fig, data, "dm-fvu-vs-width", caption="...")
    print(ch.verdict("dm-nonlinear-flat", verdicts.nonlinear_flat(fvu, nl), claim=..., paper=..., ours=...))

The chapter owns what chapters share, so that it is defined once:
- the `Setting` (model, corpus, contexts, seed, device, the SAEs' learning rate and dead window)
  and precision: `bf16` is resolved once ("auto" -> what this machine runs natively) and handed
  to the stores, the trainer and the splices;
- the stores of its kind (`analysis_stores` or `gradient_stores`), recorded as its inputs;
- the SAE configurations: `config(rule, k, expansion)` takes the batch size and epochs of the
  chapter's store kind (`sae_*` on analysis stores, `zoo_*` on gradient stores) and the g-SAE's
  `zoo_beta`, so two chapters that ask for "TopK at k 32, 8x" get the same cache entry;
- the notebook, profile and parameters that every figure and verdict is recorded with.
"""

from __future__ import annotations

from typing import Any, Mapping

import pandas as pd
from torch import Tensor

from sae_repro.activations import ActivationStore
from sae_repro.experiments import Setting, analysis_stores, fresh_store, gradient_stores, resid
from sae_repro.figures import record_input, record_verdict, save_figure, save_page
from sae_repro.jumprelu import JumpReLUConfig
from sae_repro.precision import resolve_bf16
from sae_repro.profiles import PARAMETERS
from sae_repro.sae import SparseAutoencoder
from sae_repro.train import TrainConfig, training_summary
from sae_repro.verdicts import Verdict
from sae_repro.zoo import ladder, trained_jumprelu, trained_sae

HELDOUT_TOKENS = 4096  # an SAE's held-out FVU curve: paired over time, so 32 contexts suffice
# store kind -> the parameters that size its SAEs' training (batch size, epochs)
_TRAINING = {"analysis": ("sae_batch_size", "sae_epochs"), "gradient": ("zoo_batch_size", "zoo_epochs")}


class Chapter:
    """One notebook's run: its name, profile and parameters, and what it shares with the others."""

    def __init__(self, name: str, profile: str, params: Mapping[str, Any]):
        self.name, self.profile = name, profile
        self.params = dict(params)  # what figures and verdicts are recorded with
        device = self.params.get("device", "cpu")
        self.bf16: bool = resolve_bf16(self.params.get("bf16", False), device)
        self.stores: dict[str, ActivationStore] = {}
        self._heldout: dict[str, Tensor] = {}  # hook -> the held-out tokens SAEs follow
        self._kind: str | None = None

    @classmethod
    def open(cls, name: str, namespace: Mapping[str, Any]) -> "Chapter":
        """The chapter of a notebook whose parameters are the globals `namespace` holds (call it
        right after the parameters cell: every profile parameter defined there is taken)."""
        if "profile" not in namespace:
            raise ValueError(f"Chapter.open({name!r}): no `profile` in the parameters cell")
        params = {k: v for k, v in namespace.items() if k in PARAMETERS}
        return cls(name, namespace["profile"], params)

    def __getitem__(self, name: str) -> Any:
        if name not in self.params:
            raise KeyError(f"parameter {name!r} is not declared by notebook {self.name}; "
                           f"it declares {sorted(self.params)}")
        return self.params[name]

    # ------------------------------------------------------------------------------ setting

    @property
    def setting(self) -> Setting:
        p = self
        return Setting(model=p["model"], corpus=p["corpus"], ctx_len=p["ctx_len"],
                       drop_first=p["drop_first"], seed=p["seed"], device=p["device"], bf16=self.bf16,
                       dead_window_tokens=p["sae_dead_window_tokens"], lr=p["sae_lr"],
                       ladder=tuple(p["sae_ladder"]))

    @property
    def hook(self) -> str:
        """The residual stream the SAE chapters study (after block `sae_layer`)."""
        return resid(self["sae_layer"])

    def lm(self):
        """The chapter's model (the one its stores were collected from)."""
        from sae_repro.models import load_model

        return load_model(self["model"], device=self["device"], seed=self["seed"])

    # ------------------------------------------------------------------------------ stores

    def analysis_stores(self) -> dict[str, ActivationStore]:
        """{"train", "test"} analysis stores (`experiments.analysis_stores`), recorded as inputs."""
        stores = analysis_stores(self.setting, sae_layer=self["sae_layer"], layers=self["layers"],
                                 n_train=self["an_n_train"], n_test=self["an_n_test"])
        return self._opened("analysis", stores)

    def gradient_stores(self) -> dict[str, ActivationStore]:
        """{"train", "test"} stores with loss gradients (`experiments.gradient_stores`), recorded."""
        stores = gradient_stores(self.setting, sae_layer=self["sae_layer"],
                                 n_train=self["zoo_n_train"], n_test=self["zoo_n_test"])
        return self._opened("gradient", stores)

    def fresh_store(self, n_tokens: int) -> ActivationStore:
        """`n_tokens` training-split tokens at the chapter's hook that the analysis training store
        (`an_n_train`) does not hold (`experiments.fresh_store`), recorded as an input."""
        store = fresh_store(self.setting, sae_layer=self["sae_layer"], skip_tokens=self["an_n_train"],
                            n_tokens=n_tokens)
        record_input("activations/fresh", store.root)
        return store

    def _opened(self, kind: str, stores: dict[str, ActivationStore]) -> dict[str, ActivationStore]:
        if self._kind not in (None, kind):
            raise ValueError(f"{self.name}: opened {self._kind} stores already; a chapter trains on "
                             f"one kind, so that its SAEs' configurations are the shared ones")
        for split, store in stores.items():
            record_input(f"activations/{split}", store.root)
        self._kind, self.stores, self._heldout = kind, stores, {}
        return stores

    def record_input(self, name: str, path: Any) -> str:
        """Declare another file this chapter read (`figures.record_input`)."""
        return record_input(name, path)

    # ------------------------------------------------------------------------------ SAEs

    def config(self, rule: str, k: int, expansion: int | None = None, **kw: Any) -> TrainConfig:
        """The shared training config of `rule` at `k` and `expansion` (default: main_expansion)
        on this chapter's stores; `kw` changes a field on purpose (aux, epochs, another seed)."""
        if self._kind is None:
            raise ValueError(f"{self.name}: open the chapter's stores before asking for an SAE config")
        batch, epochs = _TRAINING[self._kind]
        base: dict[str, Any] = {"rule": rule, "k": k, "batch_size": self[batch], "epochs": self[epochs],
                                "expansion": self["main_expansion"] if expansion is None else expansion}
        if rule == "gradient_topk":
            base["beta"] = self["zoo_beta"]
        return self.setting.train_config(**(base | kw))

    def sae(self, rule: str, k: int, expansion: int | None = None, *, hook: str | None = None,
            data: Tensor | None = None, data_key: str | None = None,
            init: tuple[SparseAutoencoder, str] | None = None, heldout: Tensor | None = None,
            **kw: Any) -> tuple[SparseAutoencoder, pd.DataFrame, str]:
        """The trained (or cached) SAE of `config(rule, k, expansion, **kw)` -> (sae, history, key).

        It trains on the training store at `hook` (default: the chapter's hook), following its
        held-out FVU on `heldout(hook)`, or on a tensor `data` [n, d] derived from the stores
        (keyed by its bytes and `data_key`), following it on `heldout` [m, d] if given."""
        cfg = self.config(rule, k, expansion, **kw)
        if data is not None:
            return trained_sae(data, cfg, data_key=data_key, init=init, heldout=heldout)
        hook = hook or self.hook
        return trained_sae(self.stores["train"], cfg, hook=hook, init=init, heldout=self.heldout(hook))

    def main_sae(self, expansion: int | None = None) -> tuple[SparseAutoencoder, pd.DataFrame, str]:
        """The main SAE (TopK at main_k on the chapter's hook, default main_expansion) or, at
        another expansion, one of the Dark Matter width sweep: trained for `main_epochs`, the
        budget the evidence needs converged (`sae_epochs` is every other SAE's)."""
        return self.sae("topk", self["main_k"], expansion, epochs=self["main_epochs"])

    def jumprelu(self, expansion: int | None = None, *, hook: str | None = None, data: Tensor | None = None,
                 data_key: str | None = None, heldout: Tensor | None = None,
                 **kw: Any) -> tuple[SparseAutoencoder, pd.DataFrame, str]:
        """The JumpReLU SAE (`sae_repro.jumprelu`) at `expansion` (default main_expansion), aimed at
        L0 = main_k with the batch size, lr and budget of the TopK SAEs it is compared with (on
        analysis stores `main_epochs`, the width sweep's; on gradient stores `zoo_epochs`, the
        zoo's) -> (sae, history, key); `kw` changes a `JumpReLUConfig` field on purpose (another
        seed, target_l0, epochs). It trains on the training store at `hook` (default: the
        chapter's hook), or on a tensor `data` [n, d] derived from the stores, as `sae` does."""
        if self._kind is None:
            raise ValueError(f"{self.name}: open the chapter's stores before asking for an SAE")
        batch, epochs = _TRAINING[self._kind]
        base = {"expansion": self["main_expansion"] if expansion is None else expansion,
                "target_l0": float(self["main_k"]), "batch_size": self[batch],
                "epochs": self["main_epochs" if self._kind == "analysis" else epochs],
                "lr": self["sae_lr"], "seed": self["seed"]}
        cfg = JumpReLUConfig(**(base | kw))
        if data is not None:
            return trained_jumprelu(data, cfg, data_key=data_key, heldout=heldout)
        hook = hook or self.hook
        return trained_jumprelu(self.stores["train"], cfg, hook=hook, heldout=self.heldout(hook))

    def ladder(self, key: str) -> list[tuple[dict[str, Any], SparseAutoencoder]]:
        """The budget ladder of the SAE `key` (`zoo.ladder`): (row, sae) per rung by steps, the
        finished SAE last; row has step, tokens, heldout_fvu and rung_share."""
        return ladder(key)

    def training(self, history: pd.DataFrame, n_tokens: int | None = None) -> dict[str, Any]:
        """How an SAE of this chapter was trained, as columns for a figure's CSV: steps, tokens
        seen, distinct tokens (n_tokens; default: the training store's), epochs, held-out FVU
        and its plateau (`train.training_summary`)."""
        batch, _ = _TRAINING[self._kind]
        n = n_tokens if n_tokens is not None else self.stores["train"].spec.n_tokens
        return training_summary(history, n, self[batch])

    def heldout(self, hook: str) -> Tensor:
        """The first HELDOUT_TOKENS tokens of the test store at `hook`: what an SAE trained on the
        train store follows its held-out FVU on (`train.plateau` reads the curve). Read once."""
        if hook not in self._heldout:
            self._heldout[hook] = self.stores["test"].load(hook, max_tokens=HELDOUT_TOKENS)
        return self._heldout[hook]

    # ------------------------------------------------------------------------------ results

    def figure(self, fig, data: pd.DataFrame, fig_id: str, caption: str = ""):
        """Save a figure with its data and manifest entry (`figures.save_figure`)."""
        return save_figure(fig, data, fig_id, notebook=self.name, profile=self.profile,
                           params=self.params, caption=caption)

    def page(self, fragment: str, data: pd.DataFrame, page_id: str, *, title: str, caption: str = "",
             inline: bool = True):
        """Save an HTML view (`sae_repro.views`) as a page with its data (`figures.save_page`)."""
        return save_page(fragment, data, page_id, title=title, notebook=self.name,
                         profile=self.profile, params=self.params, caption=caption, inline=inline)

    def verdict(self, claim_id: str, verdict: Verdict, *, claim: str, paper: str, ours: str) -> str:
        """Record a claim's verdict, decided by a `sae_repro.verdicts` criterion; returns the line
        to print."""
        return record_verdict(claim_id, claim=claim, paper=paper, ours=ours, verdict=verdict.verdict,
                              why=verdict.why, notebook=self.name, profile=self.profile,
                              interval=verdict.interval, trend=verdict.trend)
