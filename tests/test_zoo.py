import pytest
import torch

from sae_repro import zoo
from sae_repro.activations import ActivationSpec, collect
from sae_repro.train import TrainConfig

HOOK = "blocks.1.hook_resid_post"



def test_trained_sae_is_cached_and_keyed_by_config(isolated_cache, monkeypatch):
    store = collect(ActivationSpec(model="tiny-random", hooks=(HOOK,), n_tokens=1_024, ctx_len=32,
                                   drop_first=2, dtype="float32"), progress=False)
    calls = []
    real = zoo.train_sae
    monkeypatch.setattr(zoo, "train_sae", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    cfg = TrainConfig(k=4, expansion=2, batch_size=256, epochs=1.0)
    sae, hist, key = zoo.trained_sae(store, cfg, hook=HOOK, progress=False)
    again, hist2, key2 = zoo.trained_sae(store, cfg, hook=HOOK, progress=False)
    assert len(calls) == 1 and key == key2  # the second call loads the saved SAE
    torch.testing.assert_close(again.W_dec, sae.W_dec)
    assert list(hist2["step"]) == list(hist["step"])
    _, _, key3 = zoo.trained_sae(store, TrainConfig(k=4, expansion=2, batch_size=256, epochs=1.0,
                                                    rule="mutual_choice"), hook=HOOK, progress=False)
    assert len(calls) == 2 and key3 != key  # another rule is another SAE
    assert not list((isolated_cache / "saes").glob(".tmp-*"))


def test_trained_sae_on_a_tensor_is_keyed_by_its_content(isolated_cache, monkeypatch):
    # the same label on other numbers (e.g. an error part computed by another code version)
    # must train a new SAE, not reuse the stale one; the same numbers reuse it
    calls = []
    real = zoo.train_sae
    monkeypatch.setattr(zoo, "train_sae", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(k=2, expansion=2, batch_size=128, epochs=1.0)
    _, _, key = zoo.trained_sae(x, cfg, data_key="linear error", progress=False)
    _, _, key_same = zoo.trained_sae(x.clone(), cfg, data_key="linear error", progress=False)
    assert len(calls) == 1 and key_same == key
    nudged = x.clone()
    nudged[3, 5] += 1e-6
    _, _, key_nudged = zoo.trained_sae(nudged, cfg, data_key="linear error", progress=False)
    assert len(calls) == 2 and key_nudged != key
    _, _, key_unlabelled = zoo.trained_sae(x, cfg, progress=False)  # a label is optional
    assert key_unlabelled != key


def test_the_ladder_is_cached_with_the_sae_and_checked(isolated_cache):
    import pytest

    x = torch.randn(2048, 8, generator=torch.Generator().manual_seed(0))
    held = torch.randn(256, 8, generator=torch.Generator().manual_seed(1))
    cfg = TrainConfig(k=2, expansion=2, batch_size=128, epochs=2.0, ladder=(0.25, 0.5))  # 32 steps
    sae, hist, key = zoo.trained_sae(x, cfg, heldout=held, progress=False)
    rungs = zoo.ladder(key)
    assert [r["step"] for r, _ in rungs] == [8, 16, 32] and [r["rung_share"] for r, _ in rungs] == [0.25, 0.5, 1.0]
    assert all(r["heldout_fvu"] > 0 for r, _ in rungs)
    torch.testing.assert_close(rungs[-1][1].W_dec, sae.W_dec)
    assert not (isolated_cache / "checkpoints" / key).exists()  # a finished SAE keeps no checkpoint
    weights = next((isolated_cache / "saes" / key / "rungs").glob("*/sae_weights.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(ValueError, match="does not match its checksum"):
        zoo.ladder(key)


def test_trained_jumprelu_is_cached_checked_and_keyed_by_config(isolated_cache, monkeypatch):
    from sae_repro.jumprelu import JumpReLUConfig

    store = collect(ActivationSpec(model="tiny-random", hooks=(HOOK,), n_tokens=1_024, ctx_len=32,
                                   drop_first=2, dtype="float32"), progress=False)
    calls = []
    real = zoo.train_jumprelu
    monkeypatch.setattr(zoo, "train_jumprelu", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    cfg = JumpReLUConfig(expansion=2, target_l0=8.0, batch_size=256, epochs=2.0)
    sae, hist, key = zoo.trained_jumprelu(store, cfg, hook=HOOK)
    again, _, key2 = zoo.trained_jumprelu(store, cfg, hook=HOOK)
    assert len(calls) == 1 and key == key2 and again.cfg.rule == "jumprelu"
    torch.testing.assert_close(again.threshold, sae.threshold)
    _, _, key3 = zoo.trained_jumprelu(store, JumpReLUConfig(expansion=2, target_l0=4.0, batch_size=256,
                                                            epochs=2.0), hook=HOOK)
    assert len(calls) == 2 and key3 != key
    weights = isolated_cache / "saes" / key / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])  # a truncated file: retrained with a warning
    with pytest.warns(UserWarning, match="retraining"):
        zoo.trained_jumprelu(store, cfg, hook=HOOK)
    assert len(calls) == 3
    x = store.load(HOOK).float()  # a tensor derived from the store: keyed by its bytes and label
    _, _, tkey = zoo.trained_jumprelu(x, cfg, data_key="part")
    _, _, tkey2 = zoo.trained_jumprelu(x.clone(), cfg, data_key="part")
    assert len(calls) == 4 and tkey == tkey2 and tkey not in (key, key3)
    _, _, tkey3 = zoo.trained_jumprelu(x, cfg, data_key="other part")
    _, _, tkey4 = zoo.trained_jumprelu(x * 2, cfg, data_key="part")
    assert len(calls) == 6 and len({tkey, tkey3, tkey4}) == 3
