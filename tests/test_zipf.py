import numpy as np
import pytest
import torch

from sae_repro.metrics import feature_density
from sae_repro.zipf import ZipfFit, fit_zipf, proportional_middle, supported_ranks, zipf_bootstrap, zipf_curve_frame


def _zipf_densities(n=5000, exponent=1.2, c=0.05, noise=0.1, seed=0) -> np.ndarray:
    """c * r^-exponent times log-normal noise, shuffled (the fit must sort)."""
    rng = np.random.default_rng(seed)
    r = np.arange(1, n + 1)
    d = c * r ** -exponent * np.exp(noise * rng.standard_normal(n))
    return rng.permutation(d)


def test_recovers_known_exponent():
    d = _zipf_densities()
    fit = fit_zipf(d)
    assert isinstance(fit, ZipfFit) and fit.n_fitted == 5000 and fit.n_dead == 0
    # Sorting noisy values biases the tail slightly, so allow a tolerance on top of the SE.
    assert abs(fit.exponent - 1.2) < 0.01
    assert fit.exponent_se > 0 and fit.log_c_se > 0
    assert abs(fit.log_c - np.log(0.05)) < 0.1
    assert fit.r2_all > 0.99 and fit.r2_middle > 0.98
    assert fit.middle == (100, 5000)  # 20,000 clipped to the 5000 latents
    np.testing.assert_allclose(fit.predict([1, 10]), np.exp(fit.log_c) * np.array([1, 10.0]) ** -fit.exponent)


def test_noise_free_is_exact_and_accepts_tensors():
    r = torch.arange(1, 1001, dtype=torch.float64)
    fit = fit_zipf(3.0 * r ** -0.8, middle=(10, 500), fit_on="middle")
    assert fit.exponent == pytest.approx(0.8, abs=1e-10)
    assert fit.log_c == pytest.approx(np.log(3.0), abs=1e-9)
    assert fit.r2_all == pytest.approx(1.0) and fit.r2_middle == pytest.approx(1.0)
    assert fit.n_fitted == 491 and fit.middle == (10, 500)


def test_sampled_counts_recover_exponent_in_middle():
    # Firing counts sampled from a Zipf probability: the tail is dominated by small-count noise
    # (and zeros, i.e. dead latents), but the middle still gives the exponent.
    rng = np.random.default_rng(1)
    n_latents, n_tokens, exponent = 5000, 2_000_000, 1.2
    p = 0.2 * np.arange(1, n_latents + 1) ** -exponent
    counts = rng.binomial(n_tokens, p)
    fit = fit_zipf(counts / n_tokens, middle=(20, 1000), fit_on="middle")
    # Not 'within k SEs': OLS SEs ignore the correlation of sorted residuals (see zipf.py).
    assert abs(fit.exponent - exponent) < 0.015
    assert fit.r2_middle > 0.99
    assert fit.n_fitted == 981


def test_density_from_codes_with_dead_latents():
    # Real usage: densities from metrics.feature_density; dead latents are excluded and counted.
    gen = torch.Generator().manual_seed(0)
    n_tokens, n_latents, n_dead = 20_000, 400, 37
    p = 0.3 * torch.arange(1, n_latents + 1, dtype=torch.float64) ** -1.0
    p[-n_dead:] = 0.0
    codes = torch.bernoulli(p.expand(n_tokens, -1), generator=gen)
    dens = feature_density(codes)
    fit = fit_zipf(dens, middle=(5, 200), fit_on="middle")
    assert fit.n_dead == n_dead and fit.n_latents == n_latents
    assert abs(fit.exponent - 1.0) < 0.05
    frame = zipf_curve_frame(dens, fit)
    assert list(frame.columns) == ["rank", "density", "fitted", "in_middle"]
    assert len(frame) == n_latents and (frame["density"].iloc[-n_dead:] == 0).all()
    assert frame["density"].is_monotonic_decreasing and frame["in_middle"].sum() == 196


def test_middle_beyond_n_is_clipped():
    d = _zipf_densities(n=300)
    fit = fit_zipf(d, middle=(100, 20_000), fit_on="middle")
    assert fit.middle == (100, 300) and fit.n_fitted == 201
    far = fit_zipf(d, middle=(1000, 2000))  # no middle ranks: r2_middle is undefined
    assert far.middle == (300, 300) and np.isnan(far.r2_middle)
    with pytest.raises(ValueError, match="middle"):
        fit_zipf(d, middle=(1000, 2000), fit_on="middle")


@pytest.mark.parametrize("bad, match", [
    (np.array([]), "non-empty"),
    (np.zeros(10), "density > 0"),
    (np.array([0.5, np.nan, 0.1, 0.2]), "NaN"),
    (np.array([0.5, -0.1, 0.1, 0.2]), "negative"),
    (np.ones((3, 3)), "1-d"),
])
def test_bad_densities(bad, match):
    with pytest.raises(ValueError, match=match):
        fit_zipf(bad)


def test_bad_arguments():
    d = _zipf_densities(n=100)
    with pytest.raises(ValueError, match="fit_on"):
        fit_zipf(d, fit_on="tail")
    with pytest.raises(ValueError, match="middle"):
        fit_zipf(d, middle=(50, 10))
    with pytest.raises(ValueError, match="fit was made on"):
        zipf_curve_frame(d[:50], fit_zipf(d))


def test_the_paper_middle_scales_with_width_and_the_curve_stops_where_firings_run_out():
    from sae_repro.zipf import proportional_middle, supported_ranks

    assert proportional_middle(24_576) == (100, 20_000)
    assert proportional_middle(4608) == (19, 3750)
    n_tokens = 10_000
    counts = np.array([500, 100, 31, 30, 29, 3, 0])
    assert supported_ranks(counts / n_tokens, n_tokens) == 4  # 30 counts, 29 does not
    assert supported_ranks(counts / n_tokens, n_tokens, min_firings=3) == 6


def test_fit_zipf_max_rank_keeps_only_the_densest_ranks():
    ranks = np.arange(1, 201, dtype=float)
    d = 0.1 * ranks**-1.0
    d[150:] = 1e-9  # a tail that breaks the law
    cut = fit_zipf(d, middle=(10, 100), max_rank=150)
    assert cut.r2_all == pytest.approx(1.0) and cut.exponent == pytest.approx(1.0)
    assert cut.n_cut == 50 and cut.n_dead == 0 and fit_zipf(d).r2_all < 0.99
    with pytest.raises(ValueError, match="max_rank=0"):
        fit_zipf(d, max_rank=0)


def test_zipf_bootstrap_recomputes_the_verdicts_numbers_on_resampled_contexts():
    # 200 contexts of 50 tokens; latent r fires with probability ~ 0.3 r^-1 on each token
    rng = np.random.default_rng(0)
    n_ctx, per, n_lat = 200, 50, 400
    p = 0.3 / np.arange(1, n_lat + 1)
    firings = rng.binomial(per, p, size=(n_ctx, n_lat)).astype(float)
    tokens = np.full(n_ctx, float(per))
    out = zipf_bootstrap(firings, tokens, seed=0)
    d = firings.sum(0) / tokens.sum()
    n_ok = supported_ranks(d, int(tokens.sum()))
    want_all = fit_zipf(d, middle=proportional_middle(n_lat), max_rank=n_ok).r2_all
    want_mid = fit_zipf(d, middle=proportional_middle(n_lat), fit_on="middle", max_rank=n_ok).r2_middle
    (r2_all, (lo, hi)), (r2_mid, (mlo, mhi)) = out["r2_supported"], out["r2_middle"]
    assert r2_all == want_all and r2_mid == want_mid
    assert lo <= r2_all <= hi and mlo <= r2_mid <= mhi and 0 < hi - lo < 0.05
    assert zipf_bootstrap(firings, tokens, seed=0) == out  # seeded
    with pytest.raises(ValueError, match="firings must be"):
        zipf_bootstrap(firings[0], tokens)
