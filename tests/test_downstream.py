"""Downstream shares from per-context splice sums: hand-computed cases."""

import numpy as np
import pytest
import torch

from sae_repro.downstream import compare_splices, error_sums, gain_at_equal_l0, part_shares
from sae_repro.splice import ZERO, ContextLosses

NAMES = ("clean", ZERO, "8x Sae", "8x Sae + LinearError", "8x Sae + NonlinearError")


def _losses(ce: list[list[float]], kl: list[list[float]]) -> ContextLosses:
    return ContextLosses(NAMES, np.array(ce, dtype=float), np.array(kl, dtype=float), tokens_per_context=10)


def test_shares_are_ratios_of_context_sums():
    # 3 contexts; per-context CE sums of clean, zero, Sae, Sae + Lin (nonlinear left out), Sae + Nonlin
    ce = [[10, 10, 10], [50, 50, 50], [13, 12, 11], [12, 11, 10.5], [11, 11, 10.5]]
    kl = [[0, 0, 0], [9, 9, 9], [2, 2, 2], [1, 1, 1.5], [0.5, 0.5, 1]]
    sq_error, sq_nl = np.array([4.0, 4.0, 2.0]), np.array([2.0, 1.0, 1.0])
    s = part_shares(_losses(ce, kl), "8x ", sq_error, sq_nl, seed=0)
    nl, lin = s["nonlinear error"], s["linear error"]
    # Sae raises the CE by 3 + 2 + 1 = 6; leaving only the nonlinear error out raises it by 2 + 1 + 0.5
    assert nl["ce_share"] == pytest.approx(3.5 / 6)
    # the authors': adding the nonlinear error back (Sae + Nonlin) recovers (13-11) + (12-11) + (11-10.5)
    assert nl["ce_share_authors"] == pytest.approx(3.5 / 6)
    assert lin["ce_share"] == pytest.approx(2.5 / 6)
    assert lin["ce_share_authors"] == pytest.approx((1 + 1 + 0.5) / 6)
    assert nl["kl_share"] == pytest.approx(3.5 / 6)
    assert nl["kl_share_authors"] == pytest.approx((6 - 2) / 6)
    assert nl["variance_share"] == pytest.approx(0.4) and lin["variance_share"] == pytest.approx(0.6)
    assert nl["gap"] == pytest.approx(3.5 / 6 - 0.4)
    for row in (nl, lin):
        for name in ("variance_share", "ce_share", "gap", "kl_share_authors"):
            assert row[name + "_lo"] <= row[name] + 1e-12 and row[name] - 1e-12 <= row[name + "_hi"]


def test_no_damage_gives_nan_shares_and_wrong_lengths_fail():
    ce = [[10, 10]] * 5
    kl = [[0, 0]] * 5
    s = part_shares(_losses(ce, kl), "8x ", np.ones(2), np.ones(2) / 2, intervals=False)
    assert np.isnan(s["nonlinear error"]["ce_share"]) and np.isnan(s["nonlinear error"]["kl_share"])
    assert s["nonlinear error"]["variance_share"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="2 spliced contexts"):
        part_shares(_losses(ce, kl), "8x ", np.ones(3), np.ones(3), intervals=False)
    with pytest.raises(KeyError, match="4x Sae"):
        part_shares(_losses(ce, kl), "4x ", np.ones(2), np.ones(2), intervals=False)


def test_error_sums_per_context():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    x_hat = torch.zeros(3, 2)
    linear = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    sq_err, sq_nl = error_sums(x, x_hat, linear, torch.tensor([0, 0, 1]))
    np.testing.assert_allclose(sq_err, [5.0, 2.0])
    np.testing.assert_allclose(sq_nl, [1.0, 2.0])
    with pytest.raises(ValueError, match="context"):
        error_sums(x, x_hat, linear, torch.tensor([0, 1]))


def test_compare_splices_is_paired_over_contexts():
    names = ("clean", ZERO, "g", "t")
    # 4 contexts of 10 tokens; g recovers 0.1 more than t in every context, so the interval is a point
    ce = np.array([[10.0] * 4, [20.0] * 4, [11.0, 12.0, 13.0, 14.0], [12.0, 13.0, 14.0, 15.0]])
    kl = np.array([[0.0] * 4, [5.0] * 4, [1.0, 2.0, 3.0, 4.0], [2.0, 3.0, 4.0, 5.0]])
    c = compare_splices(ContextLosses(names, ce, kl, tokens_per_context=10), "g", "t", seed=0)
    assert c["ce_recovered_diff"] == pytest.approx(0.1)
    assert c["ce_recovered_diff_lo"] == pytest.approx(0.1) and c["ce_recovered_diff_hi"] == pytest.approx(0.1)
    assert c["kl_diff"] == pytest.approx(-0.1)  # 1 nat per context of 10 tokens
    assert c["kl_diff_lo"] == pytest.approx(-0.1) and c["kl_diff_hi"] == pytest.approx(-0.1)


def test_gain_at_equal_l0_resamples_the_reference_with_the_runs():
    # TopK's curve moves from context to context and MC rides 0.05 above it in every one: a
    # paired bootstrap (the curve redrawn on each resample) gives exactly 0.05; resampling the
    # reference apart from the runs would not
    names = ("clean", ZERO, "t10", "t40", "m20")
    t10, t40 = np.array([0.3, 0.5, 0.7, 0.4]), np.array([0.5, 0.9, 0.8, 0.6])
    rec = {"t10": t10, "t40": t40, "m20": (t10 + t40) / 2 + 0.05}
    ce = np.array([[10.0] * 4, [20.0] * 4] + [20.0 - 10.0 * rec[n] for n in names[2:]])
    g = gain_at_equal_l0(ContextLosses(names, ce, np.zeros_like(ce), 10), {"m20": 20.0},
                         {"t10": 10.0, "t40": 40.0}, seed=0)
    assert g["mean_gain"] == pytest.approx(0.05)
    assert g["mean_gain_lo"] == pytest.approx(0.05) and g["mean_gain_hi"] == pytest.approx(0.05)


def test_gain_at_equal_l0_reads_the_reference_curve():
    # TopK at L0 10 and 40 recovers 0.5 and 0.8 in every context; MC at L0 20 (halfway in log L0:
    # the curve reads 0.65) recovers 0.7, at L0 100 (out of reach) anything
    names = ("clean", ZERO, "t10", "t40", "m20", "m100")
    rec = {"t10": 0.5, "t40": 0.8, "m20": 0.7, "m100": 0.9}
    ce = np.array([[10.0] * 3, [20.0] * 3] + [[20.0 - 10.0 * rec[n]] * 3 for n in names[2:]])
    losses = ContextLosses(names, ce, np.zeros_like(ce), tokens_per_context=10)
    g = gain_at_equal_l0(losses, {"m20": 20.0, "m100": 100.0}, {"t10": 10.0, "t40": 40.0}, seed=0)
    assert g["gains"][0] == pytest.approx(0.05) and np.isnan(g["gains"][1]) and g["n_in_reach"] == 1
    assert g["mean_gain"] == pytest.approx(0.05)
    # the same gain in every context: the interval is a point
    assert g["mean_gain_lo"] == pytest.approx(0.05) and g["mean_gain_hi"] == pytest.approx(0.05)
    # contexts that disagree widen it; none in reach: NaN
    ce2 = ce.copy()
    ce2[4] = [20.0 - 10.0 * v for v in (0.6, 0.7, 0.8)]
    g2 = gain_at_equal_l0(ContextLosses(names, ce2, np.zeros_like(ce2), 10), {"m20": 20.0}, {"t10": 10.0, "t40": 40.0})
    assert g2["mean_gain_lo"] < 0.05 < g2["mean_gain_hi"]
    far = gain_at_equal_l0(losses, {"m100": 100.0}, {"t10": 10.0, "t40": 40.0})
    assert np.isnan(far["mean_gain"]) and np.isnan(far["mean_gain_lo"])
