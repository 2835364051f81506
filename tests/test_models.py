import math

import pytest
import torch

from sae_repro.models import DEFAULT_MODEL, hook_name, load_model, parse_hook


def test_tiny_model_has_hooks_and_runs():
    m = load_model("tiny-random")
    logits = m(torch.tensor([[256, 72, 105]]))
    assert logits.shape == (1, 3, 257)
    assert hook_name(m, "resid_post", 1) == "blocks.1.hook_resid_post"
    assert parse_hook(m, "blocks.0.hook_mlp_out") == 0


def test_unknown_model_and_hook_errors_list_valid_names():
    with pytest.raises(ValueError, match="smollm2-135m"):
        load_model("no-such-model-xyz")
    m = load_model("tiny-random")
    with pytest.raises(ValueError, match=r"hook_resid_post.*L in 0\.\.1"):
        parse_hook(m, "blocks.7.hook_resid_post")
    with pytest.raises(ValueError, match="expected one of"):
        hook_name(m, "resid_middle", 0)


@pytest.mark.slow
def test_default_is_real_smollm2():
    """The embedded default completes a fact and has a held-out loss far below a random model's."""
    from sae_repro.corpus import load_corpus, tokenize_contexts

    m = load_model(DEFAULT_MODEL)
    assert m.cfg.n_layers == 30 and m.cfg.d_model == 576
    toks = m.tokenizer("The capital of Germany is", return_tensors="pt").input_ids
    assert m.tokenizer.decode(m(toks)[0, -1].argmax()) == " Berlin"
    ctx = tokenize_contexts(load_corpus().test, m.tokenizer, 128, max_contexts=32)
    with torch.no_grad():
        loss = m(ctx, return_type="loss").item()
    uniform = math.log(m.cfg.d_vocab)  # ~10.8 nats: what a random model scores at best
    print(f"held-out loss {loss:.3f} nats/token vs {uniform:.2f} for a uniform predictor")
    assert loss < 0.5 * uniform


def test_embedded_model_shapes_match_the_models():
    """Parameters are checked against these shapes before a kernel starts (profiles.setting_errors)."""
    from sae_repro.registry import EMBEDDED_MODEL_SHAPES

    m = load_model("tiny-random")
    assert EMBEDDED_MODEL_SHAPES["tiny-random"] == {"d_model": m.cfg.d_model, "n_layers": m.cfg.n_layers}


@pytest.mark.slow
def test_damaged_converted_model_is_converted_again(isolated_cache):
    """The converted SmolLM2 carries checksums: a damaged file is found on load and reconverted."""
    import shutil

    from sae_repro.models import _converted_dir
    from sae_repro.registry import EMBEDDED_MODEL_SHAPES

    real = _converted_dir().resolve()  # through the symlink into the real cache
    load_model(DEFAULT_MODEL)  # converts into the real cache if needed
    (isolated_cache / "models").unlink()  # a private copy to damage
    shutil.copytree(real, _converted_dir())
    m = load_model(DEFAULT_MODEL)
    assert EMBEDDED_MODEL_SHAPES[DEFAULT_MODEL] == {"d_model": m.cfg.d_model, "n_layers": m.cfg.n_layers}
    tokens = torch.tensor([[1, 504, 3575, 282]])
    want = m(tokens)
    weights = _converted_dir() / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="model.safetensors does not match its checksum"):
        again = load_model(DEFAULT_MODEL)
    torch.testing.assert_close(again(tokens), want)
