"""Token views: the shown tokens, their error norms with W* held out from them, the page data."""

import pytest
import torch

from sae_repro import token_views as TV


def _store(n_contexts: int = 10, per: int = 20, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    context = torch.arange(n_contexts).repeat_interleave(per)
    position = torch.arange(per).repeat(n_contexts)
    order = torch.randperm(len(context), generator=g)  # a store's rows need not be in reading order
    return context[order], position[order], torch.randn(len(context), d, generator=g)


def test_shown_tokens_are_the_first_contexts_in_reading_order():
    context, position, _ = _store()
    shown = TV.shown_tokens(context, position, 3)
    assert len(shown.rows) == 3 * 20
    assert shown.context.tolist() == [c for c in range(3) for _ in range(20)]
    assert shown.position.tolist() == list(range(20)) * 3
    assert torch.equal(context[shown.rows], shown.context) and torch.equal(position[shown.rows], shown.position)
    assert set(shown.fit_rows(context).tolist()) == set((context >= 3).nonzero().flatten().tolist())
    for bad in (0, 10):  # none shown; none left to fit W* on
        with pytest.raises(ValueError, match="n_contexts must be between 1 and 9"):
            TV.shown_tokens(context, position, bad)
    with pytest.raises(ValueError, match="one shape"):
        TV.shown_tokens(context, position[:-1], 3)


def test_error_norms_fit_the_linear_map_outside_the_shown_contexts():
    context, position, x = _store()
    shown = TV.shown_tokens(context, position, 2)
    x_hat = 0.5 * x  # the error 0.5 x is linear in x: W* = 0.5 I where it is fitted
    x_hat[shown.rows] = 0.0  # on the shown tokens the error is x: half of it is not what W* predicts
    norms = TV.error_norms(x, x_hat, shown, context)
    xs = x[shown.rows].norm(dim=1)
    torch.testing.assert_close(norms["SaeError"], xs)
    torch.testing.assert_close(norms["LinearError"], 0.5 * xs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(norms["NonlinearError"], 0.5 * xs, atol=1e-4, rtol=1e-4)
    perfect = TV.error_norms(x, x.clone(), shown, context)
    assert all(float(v.abs().max()) < 1e-5 for v in perfect.values())
    with pytest.raises(ValueError, match="x_hat must have x's shape"):
        TV.error_norms(x, x_hat[:, :-1], shown, context)


def test_token_view_shows_each_token_with_its_values():
    context, position, _ = _store()
    tokens = 100 * context + position  # token id names its place
    shown = TV.shown_tokens(context, position, 2)
    q = shown.position.float()  # the quantity: its position
    html, data = TV.token_view(shown, tokens, lambda t: f"<{t}>", {"place": q, "twice": 2 * q},
                               view_id="tv-test", title="test")
    assert data.token.tolist() == [f"<{100 * c + p}>" for c in range(2) for p in range(20)]
    assert (data.place == data.position).all() and (data.twice == 2 * data.position).all()
    assert "&lt;119&gt;" in html and "<119>" not in html  # escaped text, every shown token present
    assert 'id="tv-test"' in html and "twice" in html
    with pytest.raises(ValueError, match="one value per shown token"):
        TV.token_view(shown, tokens, str, {"short": q[:-1]}, view_id="tv-test")
    with pytest.raises(ValueError, match="data's own columns"):
        TV.token_view(shown, tokens, str, {"token": q}, view_id="tv-test")
