from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_repro.synthetic import (
    inject_noise,
    noise_correlation_table,
    rms_norm,
    sparse_features,
    zipf_firing_prob,
)


def test_shapes_and_structure():
    acts = sparse_features(500, 16, 64, avg_active=4, dense_dim=3, dense_scale=2.0, seed=0)
    assert acts.x.shape == (500, 16) and acts.codes.shape == (500, 64)
    assert acts.dictionary.shape == (64, 16) and acts.dense.shape == (500, 16)
    assert (acts.codes >= 0).all()
    torch.testing.assert_close(acts.dictionary.norm(dim=1), torch.ones(64))
    torch.testing.assert_close(acts.x, acts.sparse + acts.dense)
    assert torch.linalg.matrix_rank(acts.dense) == 3  # dense part lives in a 3-d subspace
    plain = sparse_features(500, 16, 64, avg_active=4, seed=0)
    assert (plain.dense == 0).all()
    torch.testing.assert_close(plain.x, plain.sparse)


def test_seeding():
    a = sparse_features(300, 8, 32, avg_active=3, dense_dim=2, dense_scale=1.0, seed=1)
    b = sparse_features(300, 8, 32, avg_active=3, dense_dim=2, dense_scale=1.0, seed=1)
    c = sparse_features(300, 8, 32, avg_active=3, dense_dim=2, dense_scale=1.0, seed=2)
    assert torch.equal(a.x, b.x) and torch.equal(a.codes, b.codes) and torch.equal(a.dense, b.dense)
    assert not torch.equal(a.x, c.x) and not torch.equal(a.dictionary, c.dictionary)
    xa, xha = inject_noise(a.x, a.sparse, activation_noise=1.0, reconstruction_noise=1.0, seed=5)
    xb, xhb = inject_noise(a.x, a.sparse, activation_noise=1.0, reconstruction_noise=1.0, seed=5)
    xc, _ = inject_noise(a.x, a.sparse, activation_noise=1.0, reconstruction_noise=1.0, seed=6)
    assert torch.equal(xa, xb) and torch.equal(xha, xhb) and not torch.equal(xa, xc)


@pytest.mark.parametrize("exponent, avg_active", [(1.0, 4.0), (1.5, 2.0)])
def test_frequencies_follow_zipf(exponent: float, avg_active: float):
    acts = sparse_features(20_000, 8, 200, avg_active=avg_active, zipf_exponent=exponent, seed=0)
    freq = (acts.codes > 0).double().mean(0).numpy()
    assert acts.firing_prob.max() < 1  # no clipping in this setting
    assert freq.sum() == pytest.approx(avg_active, rel=0.03)  # mean L0 = avg_active
    ranks = np.arange(1, 201)
    head = slice(0, 40)  # enough firings per feature to read the slope
    slope = np.polyfit(np.log(ranks[head]), np.log(freq[head]), 1)[0]
    assert slope == pytest.approx(-exponent, abs=0.1)


def test_zipf_clipping_is_visible():
    p = zipf_firing_prob(10, avg_active=8)
    assert p.max() == 1.0 and p.sum() < 8


def test_inject_noise_scales_and_targets():
    acts = sparse_features(4000, 32, 128, avg_active=6, seed=0)
    x, x_hat = acts.x, acts.sparse
    same_x, same_hat = inject_noise(x, x_hat, activation_noise=0.0, reconstruction_noise=0.0)
    assert torch.equal(same_x, x) and torch.equal(same_hat, x_hat)
    xn, xhn = inject_noise(x, x_hat, activation_noise=0.5, reconstruction_noise=0.0)
    assert torch.equal(xhn, x_hat)  # activation noise never reaches the reconstruction
    assert rms_norm(xn - x) == pytest.approx(0.5 * rms_norm(x), rel=0.02)
    xn, xhn = inject_noise(x, x_hat, activation_noise=0.0, reconstruction_noise=2.0)
    assert torch.equal(xn, x)  # reconstruction noise never reaches the activations
    assert rms_norm(xhn - x_hat) == pytest.approx(2.0 * rms_norm(x), rel=0.02)


def test_noise_correlation_table_diagonal():
    acts = sparse_features(4000, 32, 256, avg_active=8, seed=0)
    scales = [0.0, 0.5, 1.0, 1.5, 2.0]
    res = noise_correlation_table(acts.x, acts.sparse, scales, seed=0)
    t = res.table
    assert list(t.index) == ["activation noise", "reconstruction noise"]
    assert list(t.columns) == ["linear error", "nonlinear error"]
    assert len(res.grid) == 25
    diag = [t.loc["activation noise", "linear error"], t.loc["reconstruction noise", "nonlinear error"]]
    off = [t.loc["activation noise", "nonlinear error"], t.loc["reconstruction noise", "linear error"]]
    assert min(diag) > 0.8
    assert max(abs(v) for v in off) < 0.3 and max(abs(v) for v in off) < 0.5 * min(diag)
    # with no noise the "true" reconstruction is perfect, so every error is zero
    clean = res.grid.query("activation_noise == 0 and reconstruction_noise == 0").iloc[0]
    assert clean.sae_error_sq_norm == pytest.approx(0, abs=1e-8)
    # reconstruction noise is independent of x: the linear error stays tiny
    rec_only = res.grid.query("activation_noise == 0 and reconstruction_noise == 2").iloc[0]
    assert rec_only.linear_error_sq_norm < 0.05 * rec_only.nonlinear_error_sq_norm
    # the summary with intervals over the grid points: the table's numbers, inside their intervals
    ci = res.diagonal_intervals(seed=0)
    assert ci["diagonal"][0] == pytest.approx(min(diag)) and ci["off_diagonal"][0] == pytest.approx(max(map(abs, off)))
    for value, lo, hi in ci.values():
        assert lo <= value <= hi
    assert ci["diagonal"][1] > 0.5 and ci == res.diagonal_intervals(seed=0)
    # the FVU reading's numbers too; and a 3-scale grid (whose points a grid bootstrap would
    # make constant) keeps finite intervals: the tokens are resampled, not the grid points
    fv = noise_correlation_table(acts.x, acts.sparse, scales, seed=0, measure="fvu")
    tf = fv.table
    ci_f = fv.diagonal_intervals(seed=0)
    assert ci_f["diagonal"][0] == pytest.approx(min(tf.loc["activation noise", "linear error"],
                                                    tf.loc["reconstruction noise", "nonlinear error"]))
    small = noise_correlation_table(acts.x, acts.sparse, [0.0, 1.0, 2.0], seed=3).diagonal_intervals(seed=3)
    assert all(np.isfinite([lo, hi]).all() and lo <= v <= hi for v, lo, hi in small.values())


def test_activation_noise_leak_into_nonlinear_saturates():
    # a linear map from x' = x + n_a recovers n_a only where n_a dominates x, so the nonlinear
    # leftover of activation noise is bounded by x's own variance, however big n_a gets
    acts = sparse_features(4000, 32, 256, avg_active=8, seed=0)
    res = noise_correlation_table(acts.x, acts.sparse, [0.0, 1.0, 4.0], seed=0)
    g = res.grid.query("reconstruction_noise == 0").set_index("activation_noise")
    var_x = float((acts.x - acts.x.mean(0)).pow(2).sum(1).mean())
    assert (g.nonlinear_error_sq_norm < var_x).all()
    assert g.linear_error_sq_norm[4.0] > 10 * g.nonlinear_error_sq_norm[4.0]


def test_bad_inputs():
    with pytest.raises(ValueError, match="avg_active"):
        sparse_features(10, 4, 8, avg_active=0)
    with pytest.raises(ValueError, match="dense_dim"):
        sparse_features(10, 4, 8, avg_active=1, dense_dim=5)
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="same 2-D shape"):
        inject_noise(x, x[:, :3], activation_noise=1, reconstruction_noise=1)
    with pytest.raises(ValueError, match="activation_noise"):
        inject_noise(x, x, activation_noise=-1, reconstruction_noise=1)
    with pytest.raises(ValueError, match="2 distinct"):
        noise_correlation_table(x, x, [1.0])
    with pytest.raises(ValueError, match="measure"):
        noise_correlation_table(x, x, [0.0, 1.0], measure="r2")
