"""Every verdict criterion on hand-made inputs, on both sides of each of its boundaries."""

import math

import pytest

from sae_repro import verdicts as V

NAN = math.nan


def _v(result: V.Verdict) -> str:
    assert result.why, "every verdict says its criterion"
    return result.verdict


@pytest.mark.parametrize("fvu, nl, want", [
    ([0.4, 0.2], [0.10, 0.10], "reproduced"),           # nonlinear flat, FVU halves
    ([1.0, 0.5], [1.0, 0.75], "reproduced"),            # drop 0.25 == 0.5 * 0.5: on the boundary
    ([1.0, 0.5], [1.0, 0.7499], "partly"),              # just past half of the FVU's fall
    ([0.4, 0.2], [0.10, 0.125], "reproduced"),          # a rise counts by its size
    ([0.4, 0.2], [0.10, 0.0501], "partly"),             # drop 0.499 < 0.5
    ([0.4, 0.2], [0.10, 0.05], "not reproduced"),       # falls as fast as the FVU
    ([0.4, 0.4], [0.10, 0.10], "not reproduced"),       # the FVU does not fall
    ([0.4, 0.5], [0.10, 0.10], "not reproduced"),
])
def test_nonlinear_flat(fvu, nl, want):
    v = V.nonlinear_flat(fvu, nl)
    assert _v(v) == want
    assert bool(v.note) == (fvu[-1] >= fvu[0])  # the note says why it could not decide


def test_relative_drop_and_empty_input():
    assert V.relative_drop([4.0, 3.0, 1.0]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="values"):
        V.relative_drop([])


@pytest.mark.parametrize("main, sweep, want", [
    (0.5, [0.5], "reproduced"),
    (0.7, [0.7], "reproduced"),          # |0.7 - 0.5| = 0.2: on the boundary
    (0.3, [0.3], "reproduced"),
    (0.71, [0.71, 0.69], "partly"),      # the main SAE is out, another one in
    (0.71, [0.71, 0.29], "not reproduced"),
    (0.05, [0.05, 0.1], "not reproduced"),
])
def test_vector_half(main, sweep, want):
    assert _v(V.vector_half(main, sweep)) == want


@pytest.mark.parametrize("r2, want", [
    ([0.95, 0.91, 0.5], "reproduced"),      # median 0.91
    ([0.9, 0.9, 0.95], "partly"),           # median exactly 0.9 is not "more than"
    ([0.71, 0.8], "partly"),                # median 0.755
    ([0.7, 0.7], "not reproduced"),         # exactly 0.7 is not > 0.7
    ([0.95, NAN, 0.93], "reproduced"),      # NaN left out of the median
    ([NAN], "not reproduced"),
])
def test_norm_predictable(r2, want):
    assert _v(V.norm_predictable(r2)) == want


@pytest.mark.parametrize("r2, want", [
    ([0.7], "reproduced"), ([0.69], "partly"), ([0.4], "partly"), ([0.39], "not reproduced"),
    ([0.9, 0.1, 0.8], "reproduced"),
])
def test_same_tokens(r2, want):
    assert _v(V.same_tokens(r2)) == want


# with a 95% interval: the verdict of the interval where it lies between two boundaries, else
# inconclusive (each boundary approached from both sides, and straddled)
@pytest.mark.parametrize("ratio_ci, want", [
    ((-0.4, 0.49), "reproduced"), ((0.45, 0.55), "inconclusive"), ((0.51, 0.99), "partly"),
    ((0.9, 1.1), "inconclusive"), ((1.01, 2.0), "not reproduced"), ((-0.9, -0.6), "partly"),
    ((-0.6, -0.4), "inconclusive"), ((NAN, NAN), "inconclusive"),
])
def test_nonlinear_flat_with_an_interval(ratio_ci, want):
    r = V.nonlinear_flat([0.4, 0.2], [0.1, 0.1], ratio_ci)
    assert _v(r) == want and (want != "inconclusive" or r.note)
    assert r.interval == ratio_ci or (r.interval is None and math.isnan(ratio_ci[0]))


def test_flat_ratio_is_the_drop_of_the_nonlinear_fvu_over_the_fvus():
    assert V.flat_ratio([0.4, 0.2], [0.1, 0.09]) == pytest.approx(0.2)
    assert math.isnan(V.flat_ratio([0.2, 0.2], [0.1, 0.09]))


@pytest.mark.parametrize("ci, sweep, want", [
    ((0.31, 0.69), [0.9], "reproduced"), ((0.29, 0.4), [0.5], "inconclusive"),
    ((0.6, 0.71), [0.5], "inconclusive"), ((0.72, 0.8), [0.5], "partly"), ((0.72, 0.8), [0.9], "not reproduced"),
    ((0.1, 0.29), [0.1], "not reproduced"),
])
def test_vector_half_with_an_interval(ci, sweep, want):
    assert _v(V.vector_half(sum(ci) / 2, sweep, ci)) == want


@pytest.mark.parametrize("ci, want", [
    ((0.91, 0.95), "reproduced"), ((0.89, 0.91), "inconclusive"), ((0.71, 0.89), "partly"),
    ((0.69, 0.72), "inconclusive"), ((0.5, 0.69), "not reproduced"),
])
def test_norm_predictable_with_an_interval(ci, want):
    assert _v(V.norm_predictable([sum(ci) / 2], ci)) == want


@pytest.mark.parametrize("ci, want", [
    ((0.7, 0.8), "reproduced"), ((0.69, 0.71), "inconclusive"), ((0.4, 0.69), "partly"),
    ((0.39, 0.41), "inconclusive"), ((0.1, 0.39), "not reproduced"),
])
def test_same_tokens_with_an_interval(ci, want):
    # 0.7 and 0.4 count (>=): an interval starting on the boundary still touches it
    got = _v(V.same_tokens([sum(ci) / 2], ci))
    assert got == ("inconclusive" if ci[0] in (0.7, 0.4) else want)


def test_with_trend_records_the_direction_and_says_it():
    from sae_repro.intervals import Trend

    base = V.norm_predictable([0.8], (0.75, 0.85))
    toward = V.with_trend(base, Trend("toward", 0.05, (0.02, 0.08), 12_000.0))
    assert toward.trend == "toward" and "1.2e+04 steps" in toward.note and toward.verdict == "partly"
    assert V.with_trend(base, Trend("flat", 0.0, (-0.1, 0.1))).note == "flat with training budget"
    assert V.with_trend(base, None) is base


@pytest.mark.parametrize("shares, want", [
    ([0.05, 0.06, 0.1], "reproduced"),
    ([0.049, 0.049], "partly"),             # positive but below 5% at the median
    ([-0.01, 0.2, 0.3], "partly"),          # not positive for every pair
    ([-0.01, 0.0, 0.3], "not reproduced"),  # median 0
])
def test_nonlinear_norm_helps(shares, want):
    assert _v(V.nonlinear_norm_helps(shares)) == want


# with the interval of the median share: its whole interval graded (boundaries 0 and 5%)
@pytest.mark.parametrize("shares, ci, want", [
    ([0.06, 0.1], (0.051, 0.2), "reproduced"),
    ([0.06, 0.1], (0.03, 0.2), "inconclusive"),       # straddles 5%: reproduced or partly
    ([0.06, 0.1], (0.01, 0.049), "partly"),
    ([0.06, 0.1], (-0.01, 0.049), "inconclusive"),    # straddles 0
    ([-0.01, 0.1, 0.2], (0.03, 0.2), "partly"),       # not every pair positive: 5% does not matter
    ([-0.2, -0.1], (-0.3, -0.01), "not reproduced"),
])
def test_nonlinear_norm_helps_with_an_interval(shares, ci, want):
    v = V.nonlinear_norm_helps(shares, ci)
    assert v.verdict == want and v.interval == ci


def test_across_layers():
    assert _v(V.across_layers(["reproduced", "reproduced"])) == "reproduced"
    assert _v(V.across_layers(["not reproduced", "not reproduced (the FVU does not fall)"])) == "not reproduced"
    assert _v(V.across_layers([V.Verdict("partly", "x"), V.Verdict("reproduced", "x")])) == "partly"
    assert _v(V.across_layers(["reproduced", "not reproduced"])) == "partly"
    with pytest.raises(ValueError):
        V.across_layers([])


def test_across_layers_with_undecided_layers_and_intervals():
    R, U, N = (V.Verdict(w, "x", interval=ci) for w, ci in
               (("reproduced", (0.4, 0.6)), ("inconclusive", (0.3, 0.7)), ("not reproduced", (0.9, 1.0))))
    # the decided layers agree, one is undecided: it could agree (reproduced) or not (partly)
    v = V.across_layers([R, U, R])
    assert v.verdict == "inconclusive" and "1 of 3 layers inconclusive, the rest reproduced" in v.note
    assert v.interval == (0.3, 0.7)
    # two decided layers disagree: partly, whatever the undecided one is
    assert V.across_layers([R, U, N]).verdict == "partly"
    assert V.across_layers([U, U]).verdict == "inconclusive"
    assert V.across_layers([R, N]).interval == (0.4, 1.0)
    assert V.across_layers([R, "reproduced"]).interval is None  # a layer without one: no span


@pytest.mark.parametrize("ce, var, want", [
    ([0.5, 0.6], [0.5, 0.45], "reproduced"),           # gaps 0 and 0.15 (boundary)
    ([0.5, 0.66], [0.5, 0.5], "partly"),               # one of two widths off
    ([0.5, NAN], [0.5, 0.5], "partly"),                # NaN: that width does not count
    ([0.1, 0.5, 0.9], [0.5, 0.5, 0.5], "not reproduced"),  # one of three
    ([0.5, 0.5, 0.9], [0.5, 0.5, 0.5], "partly"),      # two of three
])
def test_downstream_proportional(ce, var, want):
    assert _v(V.downstream_proportional(ce, var)) == want


@pytest.mark.parametrize("gaps, want", [
    ([(-0.15, 0.15), (0.0, 0.1)], "reproduced"),        # both wholly within +-0.15 (boundary)
    ([(-0.1, 0.1), (0.16, 0.3)], "partly"),             # one of two wholly outside
    ([(-0.1, 0.1), (0.1, 0.2)], "inconclusive"),        # the second straddles 0.15: reproduced or partly
    ([(0.2, 0.3), (-0.4, -0.16), (-0.1, 0.2)], "not reproduced"),  # at most one of three: both readings
    ([(-0.1, 0.1), (NAN, NAN)], "partly"),              # NaN gap: that width does not count
])
def test_downstream_proportional_on_intervals(gaps, want):
    mid = [(lo + hi) / 2 for lo, hi in gaps]
    v = V.downstream_proportional(mid, [0.0] * len(gaps), gap_intervals=gaps)
    assert v.verdict == want
    finite = [g for g in gaps if g[0] == g[0]]
    assert v.interval == (min(g[0] for g in finite), max(g[1] for g in finite))
    with pytest.raises(ValueError, match="intervals"):
        V.downstream_proportional(mid, [0.0] * len(gaps), gap_intervals=gaps[:1] * (len(gaps) + 1))



def test_downstream_proportional_nan_interval_around_a_gap_is_undecided():
    # the second width has a gap (0.0) but no interval: reproduced if it is within, partly if not
    v = V.downstream_proportional([0.0, 0.0], [0.0, 0.0], gap_intervals=[(-0.1, 0.1), (NAN, NAN)])
    assert v.verdict == "inconclusive" and "1 of 2" in v.note
    # the note says the interval is undefined, and no span is reported (the finite one understates it)
    assert "1 of 2 95% intervals undefined" in v.note and "CE increase is not above 0" in v.note
    assert v.interval is None
    # decided with an undefined interval (the default run: 2x-8x wholly outside, 16x and 32x
    # undefined): still said, and still no span
    v = V.downstream_proportional([0.9, 0.9, 0.9, 0.0, 0.0], [0.5] * 3 + [0.0] * 2,
                                  gap_intervals=[(0.3, 0.5)] * 3 + [(NAN, NAN)] * 2)
    assert v.verdict == "not reproduced" and v.interval is None
    assert "2 of 5 95% intervals undefined" in v.note and "straddle" not in v.note
    # all intervals defined: a span, and no word of undefined ones
    v = V.downstream_proportional([0.0, 0.5], [0.0, 0.0], gap_intervals=[(-0.1, 0.1), (-0.2, 0.6)])
    assert v.verdict == "inconclusive" and v.interval == (-0.2, 0.6) and "undefined" not in v.note

@pytest.mark.parametrize("lin, nl, want", [
    ([0.1, 0.2], [0.2, 0.3], "reproduced"),
    ([0.1, 0.2], [0.2, 0.2], "partly"),               # equal is not worse
    ([0.1, 0.2, 0.3], [0.2, 0.1, 0.2], "not reproduced"),
])
def test_error_saes_worse(lin, nl, want):
    assert _v(V.error_saes_worse(lin, nl)) == want


@pytest.mark.parametrize("ci, want", [
    ([(0.01, 0.02), (0.001, 0.05)], "reproduced"),
    ([(0.01, 0.02), (-0.01, 0.05)], "inconclusive"),   # reproduced or partly (1 of 2 is half)
    ([(0.01, 0.02), (-0.03, 0.0)], "partly"),          # at 0 is not worse
    ([(0.01, 0.02), (-0.03, -0.01), (-0.02, -0.01)], "not reproduced"),
    ([(0.01, 0.02), (-0.03, 0.01), (-0.02, -0.01)], "inconclusive"),  # not reproduced or partly
])
def test_error_saes_worse_on_intervals(ci, want):
    mid = [(lo + hi) / 2 for lo, hi in ci]
    v = V.error_saes_worse([0.0] * len(ci), mid, ci)
    assert v.verdict == want and v.interval == (min(c[0] for c in ci), max(c[1] for c in ci))


@pytest.mark.parametrize("rel, want", [
    ([0.0, 0.0999], "reproduced"),
    ([0.05, 0.1], "not reproduced"),        # 10% is not "very slight"
    ([-0.05, 0.05], "partly"),              # slight, but a rise at one width
    ([-0.1, 0.05], "not reproduced"),
    ([0.2, 0.25], "not reproduced"),
])
def test_pursuit_slight(rel, want):
    assert _v(V.pursuit_slight(rel)) == want


@pytest.mark.parametrize("together, single, pursuit, want", [
    (0.2, [0.05, 0.05], 0.1, "reproduced"),
    (0.1, [0.05, 0.05], 0.1, "not reproduced"),   # equal to pursuit is not more
    (0.05, [0.11, 0.0], 0.1, "partly"),
    (0.0, [0.0], -0.1, "partly"),                 # beats a negative pursuit, but reduces nothing
    (0.0, [-0.2], -0.1, "not reproduced"),
])
def test_earlier_components(together, single, pursuit, want):
    assert _v(V.earlier_components(together, single, pursuit)) == want


# with the interval of together - pursuit: beats pursuit when it lies above 0
@pytest.mark.parametrize("together, single, ci, want", [
    (0.2, [0.05], (0.01, 0.2), "reproduced"),
    (0.2, [0.05], (-0.1, 0.0), "not reproduced"),      # at or below 0: not more
    (0.2, [0.05], (-0.01, 0.2), "inconclusive"),       # reproduced or not reproduced
    (0.2, [0.15], (-0.01, 0.2), "inconclusive"),       # reproduced or partly (a single beats 0.1)
    (-0.05, [0.0], (0.01, 0.2), "not reproduced"),     # beats pursuit but reduces nothing
])
def test_earlier_components_with_an_interval(together, single, ci, want):
    v = V.earlier_components(together, single, 0.1, ci)
    assert v.verdict == want and v.interval == ci
    assert (want == "inconclusive") == ("straddles 0" in v.note)


@pytest.mark.parametrize("diag, off, want", [
    ((0.9, 0.81), (0.1, -0.49), "reproduced"),
    ((0.9, 0.8), (0.1, 0.1), "partly"),            # 0.8 is not > 0.8
    ((0.9, 0.9), (0.5, 0.0), "partly"),            # off-diagonal 0.5 is not < 0.5
    ((0.9, 0.5), (0.0, 0.0), "not reproduced"),
])
def test_synthetic_noise(diag, off, want):
    assert _v(V.synthetic_noise(diag[0], diag[1], off[0], off[1])) == want


@pytest.mark.parametrize("diag_ci, off_ci, want", [
    ((0.85, 0.95), (0.1, 0.45), "reproduced"),
    ((0.75, 0.95), (0.1, 0.45), "inconclusive"),   # the diagonal straddles 0.8: reproduced or partly
    ((0.85, 0.95), (0.4, 0.6), "inconclusive"),    # the off-diagonal straddles 0.5
    ((0.6, 0.79), (0.6, 0.7), "partly"),           # both readings partly (diagonal > 0.5, below 0.8)
    ((0.1, 0.4), (0.1, 0.2), "not reproduced"),
    ((NAN, NAN), (0.1, 0.2), "inconclusive"),
])
def test_synthetic_noise_with_intervals(diag_ci, off_ci, want):
    v = V.synthetic_noise(0.9, 0.9, 0.1, 0.1, (diag_ci, off_ci))
    assert v.verdict == want
    assert v.interval == (None if diag_ci[0] != diag_ci[0] else diag_ci)


@pytest.mark.parametrize("r2_all, r2_mid, want", [
    (0.95, 0.98, "reproduced"), (0.949, 0.98, "partly"), (0.95, 0.979, "partly"),
    (0.9, NAN, "not reproduced"), (0.96, NAN, "partly"),
])
def test_zipf_law(r2_all, r2_mid, want):
    assert _v(V.zipf_law(r2_all, r2_mid)) == want


# with intervals: a threshold met when its interval lies wholly above it (0.95 overall, 0.98 middle);
# one that touches it is undecided, as in `_graded`
@pytest.mark.parametrize("ci_all, ci_mid, want", [
    ((0.951, 0.97), (0.981, 0.99), "reproduced"),
    ((0.95, 0.97), (0.981, 0.99), "inconclusive"),    # touches 0.95: reproduced or partly
    ((0.96, 0.97), (0.97, 0.979), "partly"),          # middle wholly below
    ((0.94, 0.96), (0.985, 0.99), "inconclusive"),    # overall straddles: reproduced or partly
    ((0.90, 0.94), (0.90, 0.97), "not reproduced"),   # both wholly below
    ((0.90, 0.94), (NAN, NAN), "inconclusive"),       # the middle undecided: partly or not
])
def test_zipf_law_with_intervals(ci_all, ci_mid, want):
    mid = [(lo + hi) / 2 for lo, hi in (ci_all, ci_mid)]
    v = V.zipf_law(mid[0], 0.98 if ci_mid[0] != ci_mid[0] else mid[1], (ci_all, ci_mid))
    assert v.verdict == want and (want != "inconclusive" or "straddle" in v.note)
    assert v.interval == ci_all
    assert V.zipf_law(0.97, NAN, ((0.96, 0.98), (NAN, NAN))).verdict == "partly"  # no middle: missed


def test_beats_at_equal_l0():
    assert V.beats_at_equal_l0([0.01, 0.02, -0.001])
    assert not V.beats_at_equal_l0([0.01, -0.001])        # half the points > 0 is not most
    assert not V.beats_at_equal_l0([0.1, 0.1, -0.5])      # most > 0 but the mean is negative
    assert V.beats_at_equal_l0([0.01, NAN, NAN])          # out-of-reach points are left out
    assert not V.beats_at_equal_l0([NAN])


@pytest.mark.parametrize("mc, fc, want", [
    ([0.01, 0.02], [0.01, 0.02], "reproduced"),
    ([0.01, 0.02], [-0.01, 0.02], "partly"),
    ([-0.01], [-0.02], "not reproduced"),
    ([NAN, NAN], [0.01], "inconclusive"),
    ([], [0.01], "inconclusive"),
])
def test_mc_downstream(mc, fc, want):
    assert _v(V.mc_downstream(mc, fc)) == want


# with intervals of the mean delta: a family beats TopK when most points are > 0 and its interval
# lies above 0
@pytest.mark.parametrize("mc, ci_mc, ci_fc, want", [
    ([0.01, 0.02], (0.001, 0.03), (0.002, 0.01), "reproduced"),
    ([0.01, 0.02], (0.001, 0.03), (-0.01, 0.0), "partly"),      # FC's interval at or below 0
    ([0.01, 0.02], (-0.001, 0.03), (0.002, 0.01), "inconclusive"),  # MC straddles: reproduced or partly
    ([0.01, 0.02], (-0.02, -0.001), (-0.01, 0.0), "not reproduced"),
    ([0.01, -0.02, -0.01], (0.001, 0.03), (0.002, 0.01), "partly"),  # MC: most points not > 0
])
def test_mc_downstream_with_intervals(mc, ci_mc, ci_fc, want):
    v = V.mc_downstream(mc, [0.01, 0.02], (ci_mc, ci_fc))
    assert v.verdict == want and v.interval == ci_mc
    assert (want == "inconclusive") == ("straddle" in v.note)
    assert V.mc_downstream([NAN], [0.01], (ci_mc, ci_fc)).note == "no comparable point"


# rate-ratio intervals: 0 vs 6 [0, 0.85] clear, 0 vs 5 [0, 1.09] not; 40 vs 20 [1.14, 3.61] more
@pytest.mark.parametrize("no_aux, mcz, fc, want, noted", [
    ((6, 10), 0, 0, "reproduced", False),  # both clearly below both no-aux SAEs
    ((5, 10), 0, 0, "inconclusive", True),  # one latent fewer in the lower baseline: not clear
    ((6, 10), 0, 5, "partly", False),  # FC's 5 vs 6 is not clear
    ((20, 40), 40, 20, "not reproduced", False),  # MC(zipf) clearly more than TopK's 20; FC not clear
    ((0, 0), 0, 0, "inconclusive", True),  # no dead latents without an aux loss
])
def test_mc_fewer_dead(no_aux, mcz, fc, want, noted):
    v = V.mc_fewer_dead(no_aux, mcz, fc)
    assert _v(v) == want and bool(v.note) == noted and v.interval is not None


@pytest.mark.parametrize("rho, p, want", [
    ([0.11, 0.5], [0.009, 1e-9], "reproduced"),
    ([0.1, 0.5], [1e-9, 1e-9], "partly"),     # rho exactly 0.1 is not > 0.1
    ([0.3, 0.5], [0.01, 1e-9], "partly"),     # p exactly 0.01 is not < 0.01
    ([0.05, NAN], [1e-9, 1e-9], "not reproduced"),
])
def test_hard_tokens(rho, p, want):
    assert _v(V.hard_tokens(rho, p)) == want


@pytest.mark.parametrize("ci, p, want", [
    ([(0.11, 0.3), (0.2, 0.4)], [1e-9, 1e-9], "reproduced"),
    ([(0.05, 0.3), (0.2, 0.4)], [1e-9, 1e-9], "inconclusive"),  # reproduced or partly
    ([(0.11, 0.3), (0.2, 0.4)], [1e-9, 0.01], "partly"),        # p not < 0.01 in the second
    ([(0.0, 0.1), (-0.2, 0.05)], [1e-9, 1e-9], "not reproduced"),  # at or below 0.1 in both
    ([(0.0, 0.1), (-0.2, 0.15)], [1e-9, 1e-9], "inconclusive"),  # not reproduced or partly
])
def test_hard_tokens_on_intervals(ci, p, want):
    v = V.hard_tokens([(lo + hi) / 2 for lo, hi in ci], p, ci)
    assert v.verdict == want and v.interval == (min(c[0] for c in ci), max(c[1] for c in ci))


@pytest.mark.parametrize("ce_g, ce_t, kl_g, kl_t, want", [
    ([0.9, 0.95], [0.8, 0.9], [0.1, 0.1], [0.2, 0.2], "reproduced"),
    ([0.9, 0.9], [0.8, 0.9], [0.1, 0.2], [0.2, 0.2], "partly"),   # ties at the second k
    ([0.8], [0.9], [0.2], [0.2], "not reproduced"),
    ([0.8], [0.9], [0.19], [0.2], "partly"),
])
def test_gsae_faithful(ce_g, ce_t, kl_g, kl_t, want):
    assert _v(V.gsae_faithful(ce_g, ce_t, kl_g, kl_t)) == want


@pytest.mark.parametrize("ce_ci, kl_ci, want", [
    ([(0.01, 0.02), (0.001, 0.03)], [(-0.02, -0.01), (-0.3, -0.001)], "reproduced"),  # both sides clear at both k
    ([(0.01, 0.02), (-0.01, 0.03)], [(-0.02, -0.01), (-0.3, -0.001)], "inconclusive"),  # reproduced or partly
    ([(0.01, 0.02), (-0.03, -0.01)], [(-0.02, -0.01), (0.01, 0.02)], "partly"),  # k 2 clearly worse on both
    ([(-0.02, -0.01), (-0.03, -0.01)], [(0.01, 0.02), (0.0, 0.02)], "not reproduced"),  # 0 is not better
    ([(-0.02, 0.01), (-0.03, -0.01)], [(0.01, 0.02), (0.01, 0.02)], "inconclusive"),  # partly or not
    ([(NAN, NAN), (0.01, 0.02)], [(-0.02, -0.01), (-0.02, -0.01)], "inconclusive"),  # NaN: partly or reproduced
])
def test_gsae_faithful_on_intervals(ce_ci, kl_ci, want):
    mid = lambda ci: [(lo + hi) / 2 for lo, hi in ci]  # noqa: E731
    v = V.gsae_faithful(mid(ce_ci), [0.0, 0.0], mid(kl_ci), [0.0, 0.0], ce_ci, kl_ci)
    assert v.verdict == want
    with pytest.raises(ValueError, match="both"):
        V.gsae_faithful(mid(ce_ci), [0.0, 0.0], mid(kl_ci), [0.0, 0.0], ce_ci, None)


# exact rate-ratio intervals: 0 vs 6 dead latents is [0, 0.85] (clear), 0 vs 5 is [0, 1.09] (not);
# 20 vs 40 is [0.28, 0.88]; 30 vs 40 is [0.45, 1.23]; 40 vs 20 is [1.14, 3.61]
@pytest.mark.parametrize("g, t, want", [
    ([0, 20], [6, 40], "reproduced"),  # clearly fewer at both k
    ([0, 30], [6, 40], "partly"),  # clear at one k, not at the other
    ([0, 30], [5, 40], "inconclusive"),  # no k clear: one dead latent fewer would have decided it
    ([12, 369], [18, 364], "inconclusive"),  # the 11-22 default run: 0.26% vs 0.39%, 8.0% vs 7.9% of 4608
    ([40, 30], [20, 40], "not reproduced"),  # clearly more at one k, unclear at the other
    ([0, 0], [0, 0], "inconclusive"),
])
def test_gsae_fewer_dead(g, t, want):
    v = V.gsae_fewer_dead(g, t)
    assert _v(v) == want
    lo, hi = v.interval
    assert lo <= sum(g) / max(sum(t), 1) <= hi or sum(g) == sum(t) == 0


def test_gsae_fewer_dead_wants_counts():
    with pytest.raises(ValueError, match="whole numbers >= 0"):
        V.gsae_fewer_dead([0.26], [0.39])
    with pytest.raises(ValueError, match="2 g-SAE counts but 1 TopK"):
        V.gsae_fewer_dead([1, 2], [3])


def test_compare_means_at_two_standard_errors():
    se = (0.3 ** 2 + 0.4 ** 2) ** 0.5  # 0.5: the boundary is a difference of 1.0
    assert V.compare_means(1.01, 0.3, 0.0, 0.4) == "higher"
    assert V.compare_means(0.99, 0.3, 0.0, 0.4) == "no clear difference"
    assert V.compare_means(0.0, 0.3, 1.0 + 1e-9, 0.4) == "lower"
    assert se == pytest.approx(0.5)


@pytest.mark.parametrize("calls, want, noted", [
    (["higher", "higher"], "reproduced", False),
    (["higher", "no clear difference"], "partly", False),
    (["higher", "lower"], "not reproduced", False),
    (["no clear difference", "no clear difference"], "not reproduced", True),
    (["lower", "no clear difference"], "not reproduced", False),
])
def test_gsae_steering(calls, want, noted):
    v = V.gsae_steering(calls)
    assert _v(v) == want and bool(v.note) == noted


def test_seed_noise_and_effect():
    assert V.seed_noise(0.01, 0.02, n_seeds=2, reference=1.0) == pytest.approx(0.04)
    assert V.seed_noise(0.01, 0.02, n_seeds=1, reference=0.2) == pytest.approx(0.01)
    assert V.effect(-0.05, 0.04) == "shrinks"
    assert V.effect(-0.04, 0.04) == "leaves unchanged"
    assert V.effect(0.04, 0.04) == "leaves unchanged"
    assert V.effect(0.0401, 0.04) == "grows"


def test_verdict_rejects_unknown_words():
    with pytest.raises(ValueError, match="verdict"):
        V.Verdict("partly reproduced", "x")
    assert str(V.Verdict("inconclusive", "x", "no difference")) == "inconclusive (no difference)"


@pytest.mark.parametrize("cis, want", [
    ([(0.01, 0.05), (0.0, 0.09)], "reproduced"),
    ([(0.01, 0.05), (-0.05, -0.01)], "partly"),            # a slight increase at one width
    ([(0.01, 0.05), (0.08, 0.12)], "inconclusive"),        # straddles 10%
    ([(-0.01, 0.02), (0.01, 0.05)], "inconclusive"),       # straddles 0
    ([(0.01, 0.05), (0.10, 0.15)], "not reproduced"),      # at or above 10%: clearly not slight
    ([(0.01, 0.05), (-0.3, -0.1)], "not reproduced"),      # a large increase
])
def test_pursuit_slight_with_intervals(cis, want):
    r = V.pursuit_slight([sum(c) / 2 for c in cis], cis)
    assert _v(r) == want and r.interval == (min(c[0] for c in cis), max(c[1] for c in cis))
    with pytest.raises(ValueError, match="2 intervals for 1 widths"):
        V.pursuit_slight([0.1], cis)


def test_effect_over_seeds_needs_the_interval_to_exclude_zero():
    assert V.effect_over_seeds([0.20, 0.21, 0.19], [0.30, 0.31, 0.29])[0] == "shrinks"
    assert V.effect_over_seeds([0.40, 0.41, 0.39], [0.30, 0.31, 0.29])[0] == "grows"
    word, (lo, hi) = V.effect_over_seeds([0.20, 0.35, 0.28], [0.30, 0.22, 0.27])
    assert word == "no clear change" and lo < 0 < hi
    with pytest.raises(ValueError, match="needs >= 2 values on each side"):
        V.effect_over_seeds([0.2], [0.3, 0.31])


# non-inferiority at -0.05 (INTERPRETABLE_MARGIN)
@pytest.mark.parametrize("diff, ci, want", [
    (0.02, (-0.01, 0.05), "reproduced"),  # not worse, even a little better
    (-0.03, (-0.049, -0.01), "reproduced"),  # worse, but by less than the margin
    (-0.04, (-0.07, -0.01), "inconclusive"),  # the interval straddles -0.05
    (-0.09, (-0.12, -0.051), "not reproduced"),  # worse by more than the margin
    (float("nan"), (float("nan"), float("nan")), "inconclusive"),
])
def test_gsae_interpretable(diff, ci, want):
    v = V.gsae_interpretable(diff, ci)
    assert _v(v) == want
    assert v.interval == ci or want == "inconclusive"


@pytest.mark.parametrize("l0, want", [
    ([32.0, 35.2, 28.8], "reproduced"),       # within 10% (35.2 and 28.8 on the boundary)
    ([32.0, 35.3], "inconclusive"),           # just past it above
    ([28.7, 32.0], "inconclusive"),           # and below
])
def test_a_fixed_l0_premise_holds_only_within_the_match(l0, want):
    v = V.at_fixed_l0(V.nonlinear_flat([0.4, 0.2], [0.10, 0.10]), l0, 32.0)
    assert _v(v) == want
    assert ("the SAEs differ in L0 too" in v.note) == (want == "inconclusive")
    assert V.at_fixed_l0(V.nonlinear_flat([0.4, 0.4], [0.1, 0.1]), [20.0], 32.0).verdict == "inconclusive"
    with pytest.raises(ValueError, match="target"):
        V.at_fixed_l0(V.nonlinear_flat([0.4, 0.2], [0.1, 0.1]), [32.0], 0.0)


@pytest.mark.parametrize("l0, want", [
    ([8.8, 7.2, 70.4, 57.6], "reproduced"),     # each within 10% of its own target (all on the boundary)
    ([8.9, 8.0, 64.0, 64.0], "inconclusive"),   # 8.9 for 8: just past it
    ([8.0, 8.0, 57.5, 64.0], "inconclusive"),   # 57.5 for 64: just past it below
    ([64.0, 64.0, 8.0, 8.0], "inconclusive"),   # matched to the wrong targets
])
def test_a_fixed_l0_premise_with_a_target_per_sae(l0, want):
    v = V.at_fixed_l0(V.error_saes_worse([0.3, 0.2], [0.4, 0.3]), l0, [8.0, 8.0, 64.0, 64.0])
    assert _v(v) == want
    assert v.verdict == "reproduced" or "the SAEs differ in L0 too" in v.note
    with pytest.raises(ValueError, match="2 targets for 4 L0 values"):
        V.at_fixed_l0(v, l0, [8.0, 64.0])
    with pytest.raises(ValueError, match="target"):
        V.at_fixed_l0(v, l0, [8.0, 8.0, float("nan"), 64.0])


def test_the_steering_interval_is_the_one_compare_means_decides_on():
    lo, hi = V.mean_difference_interval(0.5, 0.03, 0.3, 0.04)  # difference 0.2, SE 0.05
    assert (lo, hi) == (pytest.approx(0.2 - V.CLEAR_SE * 0.05), pytest.approx(0.2 + V.CLEAR_SE * 0.05))
    assert V.compare_means(0.5, 0.03, 0.3, 0.04) == ("higher" if lo > 0 else "no clear difference")
    assert V.compare_means(0.5, 0.09, 0.3, 0.12) == "no clear difference"  # SE 0.15: the interval holds 0
    assert V.mean_difference_interval(0.5, 0.09, 0.3, 0.12)[0] < 0
    v = V.gsae_steering(["higher", "no clear difference"], (lo, hi))
    assert v.verdict == "partly" and v.interval == (lo, hi)


def test_undefined_intervals_are_said_in_the_note():
    # a decided verdict whose interval is undefined says so (Verdict records none)
    v = V.mc_downstream([-0.01, 0.02, -0.03], [0.01, 0.02], ((NAN, NAN), (0.01, 0.02)))
    assert v.verdict == "partly" and v.interval is None and "undefined" in v.note
    v = V.mc_downstream([0.01, 0.02], [-0.01, -0.02], ((NAN, NAN), (-0.02, -0.01)))  # undecided
    assert v.verdict == "inconclusive" and "undefined" in v.note
    v = V.earlier_components(0.2, [0.05], 0.1, (NAN, NAN))
    assert v.verdict == "inconclusive" and "undefined" in v.note and v.interval is None
    # a NaN R^2 with a finite interval is not met (and the count stays sane)
    v = V.zipf_law(0.97, NAN, ((0.96, 0.98), (0.99, 0.995)))
    assert v.verdict == "partly" and "-1" not in v.note
