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
