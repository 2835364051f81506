"""Intervals on hand-made data with known answers: the context bootstrap of a mean and of a ratio
of sums, exact Poisson limits, t intervals over seeds, the side of a threshold, and trends."""

import math

import numpy as np
import pytest
import torch

from sae_repro import intervals as iv


def test_per_context_sums_tokens_by_context_in_order_of_appearance():
    values = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]])
    context = np.array([7, 7, 3, 7])
    assert np.array_equal(iv.per_context(values, context), [[7.0, 70.0], [3.0, 30.0]])
    with pytest.raises(ValueError, match="values have 4 tokens, context has 3"):
        iv.per_context(values, context[:3])


def test_bootstrap_of_a_mean_matches_the_normal_interval():
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 2.0, size=400)  # one token per context
    lo, hi = iv.context_bootstrap(lambda s: s.mean(), x, seed=1)
    se = x.std(ddof=1) / math.sqrt(x.size)
    assert lo == pytest.approx(x.mean() - 1.96 * se, abs=0.25 * se)
    assert hi == pytest.approx(x.mean() + 1.96 * se, abs=0.25 * se)
    assert iv.context_bootstrap(lambda s: s.mean(), x, seed=1) == (lo, hi)  # seeded


def test_bootstrap_resamples_contexts_together():
    # a ratio of sums (like FVU) whose contexts pair numerator and denominator exactly: every
    # resample gives the same ratio, so the interval collapses to the point
    den = np.arange(1.0, 51.0)
    lo, hi = iv.context_bootstrap(lambda a, b: a.sum() / b.sum(), 0.25 * den, den)
    assert lo == pytest.approx(0.25) and hi == pytest.approx(0.25)
    # unpaired noise widens it
    num = 0.25 * den * np.random.default_rng(0).uniform(0.5, 1.5, 50)
    lo, hi = iv.context_bootstrap(lambda a, b: a.sum() / b.sum(), num, den)
    assert lo < num.sum() / den.sum() < hi and 0.02 < hi - lo < 0.2


def test_bootstrap_resamples_rows_of_per_context_arrays():
    # [contexts, 2] sums whose second column is twice the first in every context: a resample of
    # contexts (rows) keeps the ratio; resampling along the columns would not
    sums = np.stack([np.arange(1.0, 41.0), 2 * np.arange(1.0, 41.0)], axis=1)
    lo, hi = iv.context_bootstrap(lambda a: a[:, 1].sum() / a[:, 0].sum(), sums)
    assert lo == pytest.approx(2.0) and hi == pytest.approx(2.0)


def test_r2_bootstrap_matches_the_r2_definitions_and_brackets_them():
    from sae_repro.decomposition import r2_per_dim, r2_total

    g = torch.Generator().manual_seed(0)
    y = torch.randn(3000, 6, generator=g) * torch.tensor([1.0, 2.0, 3.0, 0.5, 1.0, 4.0])
    y[:, 3] = 7.0  # a dimension without variance, predicted exactly: scores 1
    y_hat = y + 0.8 * torch.randn(3000, 6, generator=g)
    y_hat[:, 3] = 7.0
    context = torch.arange(3000) // 30
    v, (lo, hi) = iv.r2_bootstrap([(y, y_hat)], context, lambda r: r[0], per_dim=True, n_resamples=500)
    assert v == pytest.approx(r2_per_dim(y, y_hat), abs=1e-12) and lo < v < hi
    v, (lo, hi) = iv.r2_bootstrap([(y, y_hat)], context, lambda r: r[0], n_resamples=500)
    assert v == pytest.approx(r2_total(y, y_hat), abs=1e-12) and lo < v < hi < 1
    # the median over predictions; a perfect one and a useless one (R^2 = 0 around the mean)
    mean = y.mean(0, keepdim=True).expand_as(y)
    v, _ = iv.r2_bootstrap([(y, y), (y, y_hat), (y, mean)], context, n_resamples=200)
    assert v == pytest.approx(r2_total(y, y_hat), abs=1e-12)
    with pytest.raises(ValueError, match="differ in shape"):
        iv.r2_bootstrap([(y, y_hat[:, :2])], context)


def test_bootstrap_input_errors():
    with pytest.raises(ValueError, match="at least one array"):
        iv.context_bootstrap(lambda: 0.0)
    with pytest.raises(ValueError, match="different numbers of contexts"):
        iv.context_bootstrap(lambda a, b: 0.0, np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="at least 2 contexts"):
        iv.context_bootstrap(lambda a: 0.0, np.ones(1))


def test_poisson_interval_known_values():
    assert iv.poisson_interval(0) == pytest.approx((0.0, 3.689), abs=1e-3)
    assert iv.poisson_interval(1) == pytest.approx((0.0253, 5.572), abs=1e-3)
    assert iv.poisson_interval(10) == pytest.approx((4.795, 18.39), abs=1e-2)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="whole number >= 0"):
            iv.poisson_interval(bad)


def test_seed_interval_is_the_t_interval():
    lo, hi = iv.seed_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.303
    assert (lo, hi) == pytest.approx((2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)), abs=1e-3)
    with pytest.raises(ValueError, match="at least 2 seeds"):
        iv.seed_interval([1.0])


def test_side_of_a_threshold():
    assert iv.side((0.91, 0.95), 0.9) == "above"
    assert iv.side((0.80, 0.89), 0.9) == "below"
    assert iv.side((0.85, 0.95), 0.9) == "straddles"
    assert iv.side((0.90, 0.95), 0.9) == "straddles"  # touching counts as not clear
    assert iv.side((float("nan"), float("nan")), 0.9) == "straddles"


def test_trend_toward_away_and_flat():
    budgets = [100, 1000, 10_000, 100_000]
    # 0.1 per decade up from 0.5 at 100: reaches the paper's 0.9 at 10^6
    t = iv.trend(budgets, [0.5, 0.6, 0.7, 0.8], paper=0.9)
    assert t.direction == "toward" and t.slope == pytest.approx(0.1)
    assert t.budget_at_paper == pytest.approx(1e6)
    assert iv.trend(budgets, [0.8, 0.7, 0.6, 0.5], paper=0.9).direction == "away"
    # past the paper's value and still moving on: away
    assert iv.trend(budgets, [0.5, 0.6, 0.7, 0.8], paper=0.55).direction == "away"
    noisy = iv.trend(budgets, [0.70, 0.72, 0.69, 0.71], paper=0.9)
    assert noisy.direction == "flat" and noisy.budget_at_paper is None
    assert noisy.slope_interval[0] < 0 < noisy.slope_interval[1]
    with pytest.raises(ValueError, match=">= 3 distinct budgets"):
        iv.trend([100, 100, 1000], [0.1, 0.2, 0.3], paper=0.5)
    with pytest.raises(ValueError, match="budgets must be > 0"):
        iv.trend([0, 10, 100], [0.1, 0.2, 0.3], paper=0.5)


def test_rate_ratio_interval_known_values():
    lo, hi = iv.rate_ratio_interval(20, 40)  # p = 1/3, Clopper-Pearson [0.2169, 0.4668]
    assert (lo, hi) == pytest.approx((0.2169 / 0.7831, 0.4668 / 0.5332), abs=2e-3)
    # 0 vs n: the upper limit of p is 1 - 0.025^(1/n); 0 vs 6 is clear (< 1), 0 vs 5 is not
    assert iv.rate_ratio_interval(0, 6)[1] == pytest.approx((1 - 0.025 ** (1 / 6)) / 0.025 ** (1 / 6))
    assert iv.rate_ratio_interval(0, 6)[1] < 1 < iv.rate_ratio_interval(0, 5)[1]
    assert iv.rate_ratio_interval(4, 0) == (pytest.approx(iv.rate_ratio_interval(0, 4)[1] ** -1), math.inf)
    assert iv.rate_ratio_interval(0, 0) == (0.0, math.inf)
    with pytest.raises(ValueError, match="b must be a whole number >= 0"):
        iv.rate_ratio_interval(1, -2)


def test_difference_interval_is_welchs():
    from scipy import stats

    a, b = [1.0, 1.2, 0.9, 1.1], [0.5, 0.7, 0.4]
    lo, hi = iv.difference_interval(a, b)
    d = np.mean(a) - np.mean(b)
    va, vb = np.var(a, ddof=1) / 4, np.var(b, ddof=1) / 3
    dof = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 2)  # Welch-Satterthwaite
    half = stats.t.ppf(0.975, dof) * math.sqrt(va + vb)
    assert lo == pytest.approx(d - half) and hi == pytest.approx(d + half)


def test_spearman_bootstrap_is_scipys_rho_and_widens_with_context_clustering():
    from scipy import stats

    rng = np.random.default_rng(0)
    n_ctx, per = 40, 25
    context = np.repeat(np.arange(n_ctx), per)
    x = rng.normal(size=n_ctx * per)
    y = 0.5 * x + rng.normal(size=n_ctx * per)
    y[:10] = y[10]  # ties are averaged, as scipy does
    rho, (lo, hi) = iv.spearman_bootstrap(x, y, context, seed=0)
    assert rho == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert lo < rho < hi
    # a shared offset per context makes tokens of a context alike: the same n, a wider interval
    shift = np.repeat(rng.normal(size=n_ctx) * 3, per)
    _, (lo_c, hi_c) = iv.spearman_bootstrap(x + shift, y + shift, context, seed=0)
    _, (lo_i, hi_i) = iv.spearman_bootstrap(x + shift, y + shift, np.arange(n_ctx * per), seed=0)
    assert hi_c - lo_c > 1.5 * (hi_i - lo_i)
    with pytest.raises(ValueError, match="spearman_bootstrap"):
        iv.spearman_bootstrap(x, y[:-1], context)
