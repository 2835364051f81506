"""Latent cards and the interpretability proxy on hand-made SAEs and the tiny model."""

import numpy as np
import pytest
import torch

from sae_repro import latents as L
from sae_repro.models import load_model
from sae_repro.sae import SAEConfig, SparseAutoencoder
from sae_repro.steering import direct_logits


def _sae(n_latents=6, d=4, k=1) -> SparseAutoencoder:
    """Latent j reads (and writes) basis direction j % d; biases zero."""
    sae = SparseAutoencoder(SAEConfig(d_in=d, n_latents=n_latents, k=k), seed=0)
    with torch.no_grad():
        w = torch.zeros(n_latents, d)
        w[torch.arange(n_latents), torch.arange(n_latents) % d] = 1.0
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def _data(n=40, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g)
    context = torch.arange(n) // 10
    position = torch.arange(n) % 10
    return x, context, position


def test_activity_counts_and_top_tokens_match_a_dense_pass():
    sae, (x, _, _) = _sae(), _data()
    act = L.activity(sae, x, n_top=5, batch_size=7)  # batches that do not divide n
    codes = sae.eval().encode(x)
    assert act.counts.tolist() == (codes > 0).sum(0).tolist()
    for lat in range(sae.cfg.n_latents):
        n = int(act.counts[lat])
        want = codes[:, lat].topk(min(5, n)).indices if n else torch.tensor([], dtype=torch.long)
        got = act.top_idx[lat][: len(want)]
        assert torch.equal(codes[got, lat], codes[want, lat])  # the same values (ties aside)
        assert (act.top_idx[lat][len(want):] == -1).all() and (act.top_vals[lat][len(want):] == 0).all()
    assert torch.allclose(act.density, act.counts.double() / 40)


def test_card_outlines_the_argmax_and_its_logits_come_from_the_decoder_direction():
    model = load_model("tiny-random")
    d = model.cfg.d_model
    sae = SparseAutoencoder(SAEConfig(d_in=d, n_latents=32, k=4), seed=0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, d, generator=g)
    tokens = torch.randint(0, model.cfg.d_vocab, (60,), generator=g)
    context, position = torch.arange(60) // 20, torch.arange(60) % 20
    act = L.activity(sae, x, n_top=3)
    lat = int(act.counts.argmax())
    acts = L.window_activations(sae, x, None, torch.tensor([lat]), act, context, position,
                                n_examples=3, window=4)[lat]
    logits = direct_logits(model, sae.W_dec[lat].detach())[0]
    c = L.card("TopK", lat, act, acts, tokens, context, position, logits, str, n_examples=3, window=4)
    codes = sae.eval().encode(x)[:, lat]
    top = int(codes.argmax())
    toks, values, at = c.examples[0]
    assert values[at] == pytest.approx(float(codes[top])) and values[at] == max(values)
    assert toks[at] == str(int(tokens[top]))
    # the logit lists: the extremes of W_dec[lat] through the unembedding (ln_final's weight folded in)
    u = sae.W_dec[lat].detach() / sae.W_dec[lat].detach().norm()
    w = getattr(model.ln_final, "w", torch.ones(d))
    want = (u * w) @ model.W_U
    assert [t for t, _ in c.raises] == [str(int(i)) for i in want.topk(8).indices]
    assert [t for t, _ in c.lowers] == [str(int(i)) for i in (-want).topk(8).indices]
    assert c.raises[0][1] == pytest.approx(float(want.max()), rel=1e-5)
    assert c.lowers[0][1] == pytest.approx(float(want.min()), rel=1e-5)


def test_token_concentration_and_context_spread_by_hand():
    # latent 0: top 4 on tokens [7, 7, 7, 3] in contexts [0, 0, 1, 2]; latent 1: 2 firings only
    act = L.Activity(10, torch.tensor([5, 2]), torch.tensor([[4., 3, 2, 1], [2, 1, 0, 0]]),
                     torch.tensor([[0, 1, 5, 8], [2, 3, -1, -1]]))
    tokens = torch.tensor([7, 7, 1, 1, 1, 7, 1, 1, 3, 1])
    context = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2, 2])
    conc, spread = L.token_concentration(act, tokens), L.context_spread(act, context)
    assert conc[0] == pytest.approx(0.75) and torch.isnan(conc[1])
    assert spread[0] == pytest.approx(0.75) and torch.isnan(spread[1])


def test_intervals_cover_the_mean_and_the_difference():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.4, 0.6, 300), rng.uniform(0.2, 0.4, 300)
    m, lo, hi = L.mean_interval(np.r_[a, np.nan])
    assert lo < m < hi and m == pytest.approx(a.mean()) and hi - lo < 0.03
    d, lo, hi = L.difference_of_means(a, b)
    assert lo < d < hi and d == pytest.approx(0.2, abs=0.02)
    with pytest.raises(ValueError, match="at least 2 scored latents"):
        L.mean_interval([0.5, np.nan])


def test_bad_n_top():
    sae, (x, _, _) = _sae(), _data()
    with pytest.raises(ValueError, match="n_top"):
        L.activity(sae, x, n_top=0)


def test_random_concentration():
    assert L.random_concentration(torch.zeros(50, dtype=torch.long), 10) == 1.0  # one token only
    distinct = L.random_concentration(torch.arange(50), 10)
    assert distinct == pytest.approx(0.1)  # all different: 1 / n_top
    with pytest.raises(ValueError, match="n_top"):
        L.random_concentration(torch.arange(5), 6)


def test_windows_refuse_a_batch_rule_whose_codes_depend_on_the_batch():
    x, context, position = _data()
    sae = SparseAutoencoder(SAEConfig(d_in=4, n_latents=6, k=1, rule="mutual_choice", inference="batch"), seed=0)
    act = L.activity(sae, x, n_top=3)
    with pytest.raises(ValueError, match="inference='batch'.*allowed: 'threshold'"):
        L.window_activations(sae, x, None, torch.tensor([0]), act, context, position)
