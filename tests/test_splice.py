"""Splicing a replacement into the model: known answers on the tiny model."""

import math

import pytest
import torch

from sae_repro.activations import ActivationSpec, collect
from sae_repro.models import load_model
from sae_repro.splice import ZERO, context_losses, sae_replacement, spliced_losses
from sae_repro.train import TrainConfig, train_sae

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-random")


def _contexts(n: int = 4, T: int = 24) -> torch.Tensor:
    return torch.randint(0, 256, (n, T), generator=torch.Generator().manual_seed(0))


def test_identity_recovers_everything_and_zero_nothing(model):
    ctx = _contexts()
    df = spliced_losses(model, HOOK, ctx, {"identity": lambda x, rows: x}, drop_first=2,
                        progress=False).set_index("name")
    assert df.loc["identity", "kl"] == pytest.approx(0.0, abs=1e-6)
    assert df.loc["identity", "ce"] == pytest.approx(df.loc["clean", "ce"], abs=1e-6)
    assert df.loc["identity", "ce_recovered"] == pytest.approx(1.0)
    assert df.loc[ZERO, "ce_recovered"] == pytest.approx(0.0, abs=1e-12)
    assert (df.n_tokens == 4 * (24 - 1 - 2)).all()


def test_clean_loss_matches_the_model_and_only_kept_positions_change(model):
    """The clean CE is the model's own mean loss over positions drop_first..T-2; a replacement
    that changes positions before drop_first is never applied there."""
    ctx = _contexts()
    with torch.no_grad():
        per_pos = model(ctx, return_type="loss", loss_per_token=True)  # [n, T-1]
    df = spliced_losses(model, HOOK, ctx, {"big": lambda x, rows: 100 * x}, drop_first=3,
                        progress=False).set_index("name")
    assert df.loc["clean", "ce"] == pytest.approx(float(per_pos[:, 3:].mean()), rel=1e-5)
    assert df.loc["big", "kl"] > 0



def test_context_losses_are_each_contexts_sums(model):
    """Per context: the clean CE sum is the model's own loss summed over the kept positions, the
    identity's KL is 0, and the summary's means are the sums over all contexts / tokens."""
    ctx = _contexts(n=5)
    with torch.no_grad():
        per_pos = model(ctx, return_type="loss", loss_per_token=True)  # [n, T-1]
    per = context_losses(model, HOOK, ctx, {"identity": lambda x, rows: x, "shuffled": lambda x, rows: x.flip(0)},
                         drop_first=3, batch_contexts=2, progress=False)
    assert per.names == ("clean", ZERO, "identity", "shuffled") and per.tokens_per_context == 24 - 1 - 3
    ce_clean, kl_clean = per.of("clean")
    torch.testing.assert_close(torch.from_numpy(ce_clean), per_pos[:, 3:].double().sum(1), rtol=1e-5, atol=1e-4)
    assert abs(per.of("identity")[1]).max() < 1e-4 and (per.of("shuffled")[1] > 0).all()
    df = per.summary().set_index("name")
    assert df.loc["shuffled", "ce"] == pytest.approx(per.of("shuffled")[0].sum() / (5 * 20))
    with pytest.raises(KeyError, match="no spliced run 'other'"):
        per.of("other")

def test_rows_index_the_store_order(isolated_cache, model):
    """rows = c * kept + position - drop_first: the replacement sees the store's own tokens."""
    store = collect(ActivationSpec(model="tiny-random", hooks=(HOOK,), n_tokens=200, ctx_len=24,
                                   drop_first=2, dtype="float32"), progress=False)
    stored = store.load(HOOK)
    seen = []

    def check(x, rows):
        seen.append((x, rows))
        return x

    spliced_losses(model, HOOK, store.contexts(), {"check": check}, drop_first=2, batch_contexts=3,
                   progress=False)
    x = torch.cat([s[0] for s in seen])
    rows = torch.cat([s[1] for s in seen])
    assert len(rows) == 9 * 21 and int(rows.max()) < len(stored)  # 200 tokens: 9 whole contexts
    torch.testing.assert_close(x, stored[rows], atol=1e-5, rtol=1e-5)
    seen.clear()  # contexts from the 5th on (e.g. a validation split): rows start at its first token
    spliced_losses(model, HOOK, store.contexts()[4:], {"check": check}, drop_first=2, batch_contexts=3,
                   first_context=4, progress=False)
    rows = torch.cat([s[1] for s in seen])
    assert int(rows.min()) == 4 * 21 and len(rows) == 5 * 21
    torch.testing.assert_close(torch.cat([s[0] for s in seen]), stored[rows], atol=1e-5, rtol=1e-5)


def test_sae_replacement_and_bad_input(isolated_cache, model):
    store = collect(ActivationSpec(model="tiny-random", hooks=(HOOK,), n_tokens=1_000, ctx_len=24,
                                   drop_first=2, dtype="float32"), progress=False)
    sae, _ = train_sae(store, TrainConfig(k=8, expansion=2, batch_size=128, epochs=4), progress=False)
    df = spliced_losses(model, HOOK, store.contexts()[:8], {"sae": sae_replacement(sae)},
                        drop_first=2, progress=False).set_index("name")
    # a random model: the SAE's reconstruction may even lower the loss, but it moves the output
    # distribution far less than zero ablation does
    assert 0 < df.loc["sae", "kl"] < 0.5 * df.loc[ZERO, "kl"] and df.loc["sae", "ce_recovered"] > 0.5
    with pytest.raises(ValueError, match="drop_first"):
        spliced_losses(model, HOOK, store.contexts(), {}, drop_first=30, progress=False)
    with pytest.raises(ValueError, match="unknown hook"):
        spliced_losses(model, "blocks.5.hook_resid_post", store.contexts(), {}, drop_first=2)
    with pytest.raises(ValueError, match="returned"):
        spliced_losses(model, HOOK, store.contexts()[:2], {"nan": lambda x, r: x * math.nan},
                       drop_first=2, progress=False)


@pytest.mark.slow
def test_real_model_store_and_splice_agree(isolated_cache):
    """On SmolLM2-135M: the stored per-token loss is the model's own, splicing the stored
    activations back in changes nothing, and zero-ablating a middle layer destroys the
    prediction (CE recovered 1 and 0 by construction, with a large gap between them)."""
    from sae_repro.models import DEFAULT_MODEL

    hook = "blocks.15.hook_resid_post"
    store = collect(ActivationSpec(model=DEFAULT_MODEL, hooks=(hook,), n_tokens=4 * 123,
                                   split="test", dtype="float32"), progress=False)
    m = load_model(DEFAULT_MODEL)
    ctx = store.contexts()
    with torch.no_grad():
        per_pos = m(ctx, return_type="loss", loss_per_token=True)[:, 4:]  # kept positions
    torch.testing.assert_close(store.load("loss"), per_pos.flatten(), atol=1e-3, rtol=1e-3)
    stored = store.load(hook)
    df = spliced_losses(m, hook, ctx, {"stored": lambda x, rows: stored[rows]}, drop_first=4,
                        progress=False).set_index("name")
    assert df.loc["stored", "kl"] < 1e-4 and abs(df.loc["stored", "ce_recovered"] - 1) < 1e-3
    assert df.loc[ZERO, "ce"] - df.loc["clean", "ce"] > 2.0  # nats: layer 15 carries the prediction
