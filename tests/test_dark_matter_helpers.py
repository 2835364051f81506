"""Helpers of the Dark Matter downstream / reducing chapters: known answers on tiny inputs."""

from __future__ import annotations

import pytest
import torch

from sae_repro.decomposition import (
    error_replacements,
    gradient_pursuit,
    linear_error_fit,
    pursuit_reconstruct,
    rows_outside_contexts,
    variance_shares,
)
from sae_repro.metrics import fvu
from sae_repro.sae import SAEConfig, SparseAutoencoder
from sae_repro.train import reconstruct


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _sae(d: int = 8, n_latents: int = 32, k: int = 3) -> SparseAutoencoder:
    sae = SparseAutoencoder(SAEConfig(d_in=d, n_latents=n_latents, k=k), seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(0.1)  # most pre-activations positive: L0 = k on most tokens
        sae.b_dec.copy_(_randn(d, seed=5) * 0.1)
    return sae


def test_reconstruct_matches_the_dense_forward_in_any_batch_size():
    sae, x = _sae(), _randn(50, 8)
    sae.train()
    x_hat, l0 = reconstruct(sae, x, batch_size=7)
    want, codes = sae.eval()(x)
    torch.testing.assert_close(x_hat, want)
    assert torch.equal(l0, (codes > 0).sum(1)) and l0.max() <= 3 and l0.dtype == torch.long
    assert sae.training is False  # restored to the mode it was in: eval() above
    with pytest.raises(ValueError, match="batch_size"):
        reconstruct(sae, x, batch_size=0)


def test_rows_outside_contexts():
    context = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    assert torch.equal(rows_outside_contexts(context, 2), torch.tensor([4, 5, 6]))
    assert len(rows_outside_contexts(context, 0)) == 7
    with pytest.raises(ValueError, match="context"):
        rows_outside_contexts(context[None], 2)


def test_error_replacements_split_the_error_exactly():
    """Sae + LinearError and Sae + NonlinearError each restore one part: adding back the missing
    part gives x; with a purely linear error, "Sae + LinearError" is x itself."""
    sae, x = _sae(), _randn(400, 8)
    x_hat, _ = reconstruct(sae, x)
    fit = linear_error_fit(x, x - x_hat, seed=0)
    rep = error_replacements(sae, fit)
    rows = torch.arange(len(x))
    lin = fit.predict(x)
    torch.testing.assert_close(rep["Sae"](x, rows), x_hat)
    torch.testing.assert_close(rep["Sae + LinearError"](x, rows), x_hat + lin)
    torch.testing.assert_close(rep["Sae + NonlinearError"](x, rows), x - lin)
    nonlinear = (x - x_hat) - lin
    torch.testing.assert_close(rep["Sae + LinearError"](x, rows) + nonlinear, x)
    torch.testing.assert_close(rep["Sae + NonlinearError"](x, rows) - nonlinear, x_hat)
    bad = linear_error_fit(x, (x - x_hat)[:, :3], seed=0)
    with pytest.raises(ValueError, match="LinearError map"):
        error_replacements(sae, bad)


def test_variance_shares_known_answers():
    x = _randn(4000, 6)
    fit_lin = linear_error_fit(x, 0.5 * x, seed=0)
    s = variance_shares(x, 0.5 * x, fit_lin)  # a purely linear error
    assert s["linear_share"] == pytest.approx(1.0) and s["nonlinear_fvu"] < 1e-10
    noise = _randn(4000, 6, seed=1)
    fit_nl = linear_error_fit(x, noise, seed=0)
    s = variance_shares(x, x - noise, fit_nl)  # an independent error: nothing linear
    assert s["nonlinear_share"] == pytest.approx(1.0, abs=0.01)
    assert s["fvu"] == pytest.approx(fvu(x, x - noise))
    assert s["linear_share"] + s["nonlinear_share"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="FVU 0"):
        variance_shares(x, x, fit_nl)


def test_pursuit_reconstruct_equals_one_big_pursuit():
    sae, x = _sae(), _randn(30, 8, seed=2)
    _, l0 = reconstruct(sae, x)
    x_hat, l0_p = pursuit_reconstruct(sae, x, l0, max_elements=32 * 4)  # batches of 4 tokens
    codes = gradient_pursuit(x, sae.W_dec.detach(), sae.b_dec.detach(), l0)
    torch.testing.assert_close(x_hat, codes @ sae.W_dec.detach() + sae.b_dec.detach())
    assert torch.equal(l0_p, (codes > 0).sum(1)) and (l0_p <= l0).all()
    with pytest.raises(ValueError, match="n_active"):
        pursuit_reconstruct(sae, x, l0[:-1])
