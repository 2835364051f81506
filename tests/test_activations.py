import pytest
import torch

from sae_repro import activations as A
from sae_repro.activations import ActivationSpec, collect
from sae_repro.models import load_model

HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_mlp_out")


def spec(**kw) -> ActivationSpec:
    base = dict(model="tiny-random", hooks=HOOKS, n_tokens=1_200, ctx_len=32, drop_first=2,
                contexts_per_shard=8, batch_contexts=4, dtype="float32")
    return ActivationSpec(**(base | kw))


@pytest.fixture
def count_writes(monkeypatch):
    calls = []
    real = A._write_shard

    def counting(*args, **kw):
        calls.append(args[2])
        return real(*args, **kw)

    monkeypatch.setattr(A, "_write_shard", counting)
    return calls


def test_store_contents_and_positions(isolated_cache):
    s = collect(spec())
    x, pos = s.load(HOOKS[0]), s.load("position")
    assert x.shape == (1_200, 64) and s.load("loss").shape == (1_200,)
    assert pos.min() == 2 and pos.max() == 30  # first 2 and the last position dropped
    assert s.manifest["positions"] == [2, 31] and s.manifest["dtype"] == "float32"
    assert len(s.manifest["corpus_hash"]) == 16


def test_same_inputs_hit_cache_changed_input_recomputes(isolated_cache, count_writes):
    collect(spec())
    n_first = len(count_writes)
    assert n_first == 6  # 1200 tokens / 29 per context = 42 contexts -> 6 shards of <= 8
    collect(spec())
    assert len(count_writes) == n_first  # nothing recomputed
    collect(spec(drop_first=3))
    assert len(count_writes) == 2 * n_first  # a changed input gets its own store


def test_tokenized_corpus_is_cached_across_stores(isolated_cache, monkeypatch):
    # another store on the same split (other n_tokens, hooks) reads the tokenized contexts back
    calls = []
    real = A.tokenize_contexts
    monkeypatch.setattr(A, "tokenize_contexts", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    first = collect(spec())
    second = collect(spec(n_tokens=600, hooks=HOOKS[:1]))
    assert len(calls) == 1
    assert torch.equal(second.contexts(), first.contexts()[: len(second.contexts())])


def test_truncated_shard_is_detected_and_rebuilt(isolated_cache, count_writes):
    s = collect(spec())
    before = s.load(HOOKS[0])
    victim = s.shards[2]
    victim.write_bytes(victim.read_bytes()[:100])  # a partial write
    s2 = collect(spec())
    assert len(count_writes) == 6 + 1  # only the damaged shard is recomputed
    assert torch.equal(s2.load(HOOKS[0]), before)


def test_killed_run_resumes(isolated_cache, monkeypatch, count_writes):
    real = A._write_shard

    def dies_after_two(model, ctx, start, sp, path):
        if start >= 2 * sp.contexts_per_shard:
            raise KeyboardInterrupt
        return real(model, ctx, start, sp, path)

    monkeypatch.setattr(A, "_write_shard", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        collect(spec())
    monkeypatch.setattr(A, "_write_shard", real)
    s = collect(spec())
    assert len(s.shards) == 6
    assert not list(s.root.glob(".tmp-*"))  # no half-written file left behind


@pytest.mark.parametrize("hook", HOOKS)
def test_gradient_matches_finite_difference(isolated_cache, hook):
    """grad/<hook> is d(sum of next-token losses)/d(activation): check on one position, for a
    store holding two hooks in different layers (the graph starts at the first one's block)."""
    sp = spec(with_grad=True, n_tokens=29)
    s = collect(sp)
    model = load_model("tiny-random").double()
    tokens = A._contexts(sp, A.load_corpus(sp.corpus), model.tokenizer)[:1]
    g = s.load(f"grad/{hook}")[5].double()  # kept index 5 = position 7
    delta = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1e-4

    def total_loss(shift: torch.Tensor) -> float:
        def add(act, hook):
            act[:, 7] += shift
            return act
        logits = model.run_with_hooks(tokens, fwd_hooks=[(hook, add)])
        logp = logits.log_softmax(-1)[:, :-1]
        return float(-logp.gather(-1, tokens[:, 1:, None]).sum())

    with torch.no_grad():
        fd = (total_loss(delta) - total_loss(-delta)) / 2
    assert fd == pytest.approx(float(g @ delta), rel=1e-3)


def test_stopping_early_gives_the_same_activations(isolated_cache):
    full = collect(spec()).load(HOOKS[0])
    early = collect(spec(with_loss=False))
    assert "loss" not in early.manifest["tensors"]
    torch.testing.assert_close(early.load(HOOKS[0]), full)


def test_bad_inputs_get_clear_errors(isolated_cache):
    with pytest.raises(ValueError, match="unknown hook"):
        collect(spec(hooks=("blocks.9.hook_resid_post",)))
    with pytest.raises(ValueError, match="unknown model"):
        collect(spec(model="not-a-model"))
    with pytest.raises(ValueError, match="n_tokens=.*contexts"):
        collect(spec(n_tokens=10**9))
    with pytest.raises(ValueError, match="dtype"):
        spec(dtype="int8")
    with pytest.raises(ValueError, match="drop_first"):
        spec(drop_first=40)


def test_skip_contexts_gives_the_tokens_a_smaller_store_does_not_hold(isolated_cache):
    from dataclasses import asdict

    from sae_repro.cache import hash_inputs

    first, fresh, both = spec(n_tokens=290), spec(n_tokens=290, skip_contexts=10), spec(n_tokens=580)  # 29 kept / ctx
    a, b, ab = (collect(s, progress=False) for s in (first, fresh, both))
    assert torch.equal(torch.cat([a.contexts(), b.contexts()]), ab.contexts())
    assert torch.equal(torch.cat([a.load(HOOKS[0]), b.load(HOOKS[0])]), ab.load(HOOKS[0]))
    # a store without skipped contexts keeps the key it had before the field existed
    old = {k: v for k, v in asdict(first).items() if k != "skip_contexts"}
    corpus_hash = a.manifest["corpus_hash"]
    want = {"format": A.FORMAT_VERSION, "spec": old, "corpus": corpus_hash,
            "model": A.model_identity(first.model, first.seed)}
    assert A.store_key(first, corpus_hash) == hash_inputs(want)
    with pytest.raises(ValueError, match="skip_contexts=-1"):
        spec(skip_contexts=-1)
    with pytest.raises(ValueError, match="after skip_contexts=1000000000"):
        collect(spec(skip_contexts=10**9), progress=False)
