"""The scaling chapter's headline numbers with intervals, on a hand-made sweep whose errors
have a known linear part (x A_w) and a nonlinear part (noise) that does not shrink with width."""

import pytest
import torch

from sae_repro import verdicts
from sae_repro.decomposition import error_summary, per_token_scaling
from sae_repro.scaling import headline_scores

N, D = 4000, 8


def sweep():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g) * torch.linspace(0.5, 2.0, D)
    noise = 0.3 * torch.randn(N, D, generator=g)  # the same nonlinear error at every width
    x_hats = {}
    for w, scale in ((64, 0.6), (128, 0.4), (256, 0.2)):  # the linear part shrinks with width
        x_hats[w] = x - (scale * x @ torch.eye(D).roll(1, 0) + noise * (1 + 0.1 * torch.rand(N, 1, generator=g)))
    return x, x_hats, torch.arange(N) // 40


def test_headline_numbers_equal_their_definitions_with_intervals_around_them():
    x, x_hats, context = sweep()
    s = headline_scores(x, x_hats, main_width=128, context=context)
    direct = {w: error_summary(x, xh) for w, xh in x_hats.items()}
    assert s.vector_r2 == pytest.approx(direct[128].vector_r2, abs=1e-6)
    assert s.norm_r2 == pytest.approx(sorted(d.norm_r2 for d in direct.values())[1], abs=1e-6)
    assert s.flat_ratio == pytest.approx(verdicts.flat_ratio([direct[64].fvu, direct[256].fvu],
                                                             [direct[64].nonlinear_fvu, direct[256].nonlinear_fvu]),
                                         abs=1e-6)
    e = {w: (d.test.sae_error.norm(dim=1), d.test.nonlinear.norm(dim=1)) for w, d in direct.items()}
    r2s = sorted(per_token_scaling(e[a][0], e[b][0], e[a][1]).r2_without for a, b in ((64, 128), (64, 256), (128, 256)))
    assert s.same_tokens_r2 == pytest.approx(r2s[1], abs=1e-6)
    shares = sorted(per_token_scaling(e[a][0], e[b][0], e[a][1]).share_removed
                    for a, b in ((64, 128), (64, 256), (128, 256)))
    assert s.helps_share == pytest.approx(shares[1], abs=1e-6)
    for name in ("vector_r2", "norm_r2", "flat_ratio", "same_tokens_r2", "helps_share"):
        lo, hi = getattr(s, f"{name}_interval")
        assert lo < getattr(s, name) < hi, name
    # the nonlinear FVU is flat here while the FVU falls: a ratio near 0, an interval around it
    assert abs(s.flat_ratio) < 0.1 and s.flat_ratio_interval[1] - s.flat_ratio_interval[0] < 0.3
    assert set(s.row()) >= {"vector_r2_lo", "same_tokens_r2_hi", "helps_share_lo"}


def test_headline_scores_input_errors():
    x, x_hats, context = sweep()
    with pytest.raises(ValueError, match="main_width=512"):
        headline_scores(x, x_hats, main_width=512, context=context)
    with pytest.raises(ValueError, match="context has 10 tokens"):
        headline_scores(x, x_hats, main_width=128, context=context[:10])


def test_pursuit_gain_compares_the_encoder_with_pursuit_on_its_decoder():
    from sae_repro.decomposition import pursuit_reconstruct
    from sae_repro.sae import SAEConfig, SparseAutoencoder
    from sae_repro.scaling import pursuit_gain
    from sae_repro.train import reconstruct

    x, _, context = sweep()
    sae = SparseAutoencoder(SAEConfig(d_in=D, n_latents=32, k=3), seed=0).eval()
    g = pursuit_gain(sae, x, context)
    x_hat, l0 = reconstruct(sae, x)
    enc, gp = error_summary(x, x_hat), error_summary(x, pursuit_reconstruct(sae, x, l0)[0])
    assert g["nonlinear_gain"] == pytest.approx(1 - gp.nonlinear_fvu / enc.nonlinear_fvu, abs=1e-6)
    assert g["fvu_gain"] == pytest.approx(1 - gp.fvu / enc.fvu, abs=1e-6)
    assert g["gain_ratio"] == pytest.approx(g["nonlinear_gain"] / g["fvu_gain"])
    for name in ("nonlinear_gain", "fvu_gain"):
        assert g[f"{name}_lo"] < g[name] < g[f"{name}_hi"]
    assert g["fvu_gain"] > 0  # pursuit minimises the reconstruction error that a random encoder ignores


def _earlier_case():
    """x = a + b with a nonlinear error that a nonlinear function of `a` predicts."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)
    x = a + b
    x_hat = x - 0.5 * torch.relu(a) - 0.1 * torch.randn(N, D, generator=g)  # error: nonlinear in a
    junk = torch.randn(N, 3 * D, generator=g)
    return x, x_hat, {"relu(a)": torch.relu(a), "junk": junk}, torch.arange(N) // 40


def test_component_r2_finds_the_component_that_holds_the_nonlinear_error():
    from sae_repro.scaling import component_r2

    x, x_hat, preds, context = _earlier_case()
    half = torch.randperm(N, generator=torch.Generator().manual_seed(1))[: N // 2]
    rows = {(r["predictor"], r["part"]): r for r in component_r2(x, x_hat, preds, train_idx=half, context=context)}
    # junk predicts nothing; without an intercept it cannot even take the error's mean (R^2 < 0)
    assert rows["relu(a)", "NonlinearError"]["r2"] > 0.5 and rows["junk", "NonlinearError"]["r2"] < 0.05
    for r in rows.values():
        assert r["r2_lo"] < r["r2"] < r["r2_hi"]


def test_ridge_nonlinear_penalises_a_wide_useless_predictor_and_keeps_a_useful_one():
    from sae_repro.decomposition import explain_nonlinear
    from sae_repro.scaling import ridge_nonlinear

    x, x_hat, preds, _ = _earlier_case()
    small = torch.randperm(N, generator=torch.Generator().manual_seed(1))[:200]  # few tokens per coefficient
    junk = torch.cat([preds["junk"]] * 4, 1) + 0.01 * torch.randn(N, 12 * D, generator=torch.Generator().manual_seed(2))
    ols = explain_nonlinear(x, x_hat, {"junk": junk}, train_idx=small)[0]
    ridge = ridge_nonlinear(x, x_hat, junk, train_idx=small)
    assert ols["nonlinear_fvu_after"] > ols["nonlinear_fvu"]  # least squares overfits
    assert ridge["nonlinear_fvu_after"] < ols["nonlinear_fvu_after"] and ridge["alpha"] > 0
    useful = ridge_nonlinear(x, x_hat, torch.cat([preds["relu(a)"], preds["junk"]], 1), train_idx=small)
    assert useful["nonlinear_fvu_after"] < 0.8 * useful["nonlinear_fvu"]


def test_reductions_token_by_token_and_their_difference_over_contexts():
    import numpy as np

    from sae_repro.sae import SAEConfig, SparseAutoencoder
    from sae_repro.scaling import (
        Reduction,
        pursuit_gain_and_reduction,
        reduction_difference,
        ridge_nonlinear_and_reduction,
    )

    x, x_hat, preds, context = _earlier_case()
    half = torch.randperm(N, generator=torch.Generator().manual_seed(1))[: N // 2]
    ridge, red = ridge_nonlinear_and_reduction(x, x_hat, preds["relu(a)"], train_idx=half, context=context)
    assert red.value == pytest.approx(1 - ridge["nonlinear_fvu_after"] / ridge["nonlinear_fvu"], rel=1e-9)
    sae = SparseAutoencoder(SAEConfig(d_in=D, n_latents=32, k=3), seed=0).eval()
    gain, gp = pursuit_gain_and_reduction(sae, x[:400], context[:400])
    assert gp.value == pytest.approx(gain["nonlinear_gain"], abs=1e-6)
    d, (lo, hi) = reduction_difference(red, gp)
    assert d == pytest.approx(red.value - gp.value) and lo < d < hi
    # by hand, paired: context c's reduction is r_c under a and r_c - 0.25 under b (other tokens of
    # the same contexts), with r_c varying: resampled together the difference is 0.25 on every
    # resample; resampled apart it would not be
    r = np.linspace(0.3, 0.9, 10)
    a = Reduction(np.ones(30), np.repeat(1 - r, 3), np.repeat(np.arange(10), 3))
    b = Reduction(np.ones(20), np.repeat(1.25 - r, 2), np.repeat(np.arange(10), 2))
    d, (lo, hi) = reduction_difference(a, b)
    assert d == pytest.approx(0.25) and lo == pytest.approx(0.25) and hi == pytest.approx(0.25)
    # a context only one of the two sets has is resampled with the rest (ids matched, not positions)
    b2 = Reduction(np.ones(22), np.append(np.repeat(1.25 - r, 2), [0.5, 0.5]),
                   np.append(np.repeat(np.arange(10), 2), [42, 42]))
    d2, (lo2, hi2) = reduction_difference(a, b2)
    assert lo2 < d2 < hi2 and d2 == pytest.approx(a.value - b2.value)
