import pytest

from sae_repro import precision
from sae_repro.activations import ActivationSpec
from sae_repro.train import TrainConfig


def test_auto_follows_the_cpu_flags_and_the_environment(monkeypatch):
    monkeypatch.delenv("SAE_REPRO_BF16", raising=False)
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert precision.resolve_bf16("auto") is True
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset({"avx2"}))
    assert precision.resolve_bf16("auto") is False  # emulated bf16 is ~100x slower than fp32
    monkeypatch.setenv("SAE_REPRO_BF16", "1")
    assert precision.resolve_bf16("auto") is True
    assert precision.resolve_bf16(False) is False  # an explicit choice wins


def test_configs_store_the_resolved_bool(monkeypatch):
    monkeypatch.setenv("SAE_REPRO_BF16", "0")
    assert TrainConfig(bf16="auto").bf16 is False
    assert ActivationSpec(autocast_bf16="auto").autocast_bf16 is False
    with pytest.raises(ValueError, match="bf16='yes'"):
        TrainConfig(bf16="yes")
    monkeypatch.setenv("SAE_REPRO_BF16", "maybe")
    with pytest.raises(ValueError, match="SAE_REPRO_BF16"):
        precision.resolve_bf16("auto")
