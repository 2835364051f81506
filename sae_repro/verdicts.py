"""Verdict criteria: one function per claim of the papers, every threshold defined once, here.

A criterion takes the numbers a chapter measured and returns a `Verdict`: one of `VERDICTS`, the
criterion in words (`why`, recorded beside the verdict in the book) and, where it matters, a note
on why the criterion could not decide (`note`). Notebooks compute the numbers and call these;
they never compare a number with a threshold themselves. Each function is tested on both sides of
every boundary in tests/test_verdicts.py.

Sequences are ordered as the docstrings say (by width, smallest first, for the scaling claims).
A NaN never counts as meeting a criterion; medians leave NaNs out (as pandas' do).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np

from sae_repro.intervals import Trend, rate_ratio_interval, side

VERDICTS = ("reproduced", "partly", "not reproduced", "inconclusive")

# Dark Matter (Engels et al.)
VECTOR_TARGET = 0.5  # "about half of the error vector is linearly predictable"
VECTOR_TOLERANCE = 0.2  # |R^2 - 0.5| within this counts as "about half"
NORM_R2 = 0.9  # "more than 90% of the error norm is linearly predictable"
NORM_R2_PARTLY = 0.7
FLAT_SHARE = 0.5  # "flat": the nonlinear FVU moves by at most this share of the FVU's fall
L0_MATCH = 0.1  # ours: SAEs compared "at fixed L0" have mean L0s within this share of the target
SAME_TOKENS_R2 = 0.7  # ours (the paper gives no number): per-token error norms predicted across widths
SAME_TOKENS_R2_PARTLY = 0.4
NONLINEAR_HELPS_SHARE = 0.05  # ours: share of the rest that ||NonlinearError_i|| removes, at the median
DOWNSTREAM_TOLERANCE = 0.15  # |CE share - variance share| that we call "proportional"
PURSUIT_SLIGHT = 0.10  # a relative decrease of the nonlinear FVU below this is "very slight"
SYNTHETIC_DIAGONAL = 0.8  # planted noise vs the part it should land in: correlation above this
SYNTHETIC_DIAGONAL_PARTLY = 0.5
SYNTHETIC_OFF_DIAGONAL = 0.5  # and |correlation| with the other part below this
# Mutual / Feature Choice (Ayonrinde)
ZIPF_R2_ALL = 0.95  # paper: 0.982 over all ranks
ZIPF_R2_MIDDLE = 0.98  # paper: 0.996 on the middle ranks
HARD_TOKENS_RHO = 0.1  # Spearman rho of latents per token against the token's difficulty
HARD_TOKENS_P = 0.01
BEATS_MOST = 0.5  # "better at equal L0": mean delta > 0 and more than this share of points > 0
# g-SAEs (Olmo et al.) and the cross-paper chapter
CLEAR_SE = 2.0  # a difference of means counts when beyond this many standard errors
INTERPRETABLE_MARGIN = 0.05  # ours: "comparable" = g-SAE's mean token concentration at most this below TopK's
SEED_NOISE_STD = 2.0  # an effect counts when beyond this many training-seed standard deviations
ONE_SEED_NOISE = 0.05  # with one seed: the noise is guessed as this share of TopK's value


TRENDS = ("toward", "away", "flat")  # the headline number up the budget ladder (sae_repro.intervals.trend)


@dataclass(frozen=True)
class Verdict:
    """A criterion's outcome: `verdict` (one of VERDICTS), `why` (the criterion in words),
    `note` (why it could not decide, or what qualifies it; empty if nothing does), and where the
    criterion has them, the 95% `interval` (lo, hi) of its headline number and that number's
    `trend` with training budget (one of TRENDS; see `sae_repro.intervals`)."""

    verdict: str
    why: str
    note: str = ""
    interval: tuple[float, float] | None = None
    trend: str | None = None

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict={self.verdict!r}: expected one of {VERDICTS}")
        if self.trend is not None and self.trend not in TRENDS:
            raise ValueError(f"trend={self.trend!r}: expected one of {TRENDS} or None")
        if self.interval is not None:
            lo, hi = (float(v) for v in self.interval)
            if np.isnan(lo) or np.isnan(hi):
                # an interval undefined on some resample is no interval: the note says why
                object.__setattr__(self, "interval", None)
                return
            if lo > hi:
                raise ValueError(f"interval={self.interval!r}: expected (lo, hi) with lo <= hi")
            object.__setattr__(self, "interval", (lo, hi))

    def __str__(self) -> str:
        return self.verdict + (f" ({self.note})" if self.note else "")


def with_trend(verdict: Verdict, t: Trend | None, unit: str = "steps") -> Verdict:
    """The verdict with its number's trend up the budget ladder (`intervals.trend`), said in the
    note: where it moves toward the paper's value, the budget at which the fitted line gets there."""
    if t is None:
        return verdict
    said = {"flat": "flat with training budget", "away": "moves away from the paper's value with budget",
            "toward": "moves toward the paper's value with budget"}[t.direction]
    if t.direction == "toward" and t.budget_at_paper is not None:
        said += f" (the log-linear fit reaches it at ~{t.budget_at_paper:.3g} {unit})"
    return replace(verdict, trend=t.direction, note="; ".join(n for n in (verdict.note, said) if n))


def _floats(values: Sequence[float], name: str) -> np.ndarray:
    a = np.asarray(values, dtype=float).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name}: expected at least one value, got none")
    return a


def _median(values: Sequence[float], name: str) -> float:
    """The median of the values that are not NaN (NaN where there are none)."""
    a = _floats(values, name)
    a = a[~np.isnan(a)]
    return float(np.median(a)) if a.size else float("nan")


def _counted(n_ok: int, n: int) -> str:
    """reproduced at every point, partly at half of them or more, else not reproduced."""
    return "reproduced" if n_ok == n else "partly" if 2 * n_ok >= n else "not reproduced"


def _by_count(n_ok: int, n: int) -> str:
    """reproduced for all, partly for some, else not reproduced."""
    return "reproduced" if n_ok == n else "partly" if n_ok > 0 else "not reproduced"


# ---------------------------------------------------------------------------------------------
# Dark Matter: scaling and layers


def relative_drop(values: Sequence[float]) -> float:
    """(value at the smallest width - value at the largest) / value at the smallest."""
    v = _floats(values, "values")
    return float((v[0] - v[-1]) / v[0])


def _graded(grade: Callable[[float], str], value: float, interval: tuple[float, float] | None,
            thresholds: Sequence[float]) -> tuple[str, str, tuple[float, float] | None]:
    """grade(value), or with a 95% interval: the grade of the whole interval when it lies between
    two thresholds, else "inconclusive" -> (verdict, note, interval)."""
    if interval is None:
        return grade(value), "", None
    lo, hi = float(interval[0]), float(interval[1])
    crossed = [t for t in thresholds if lo <= t <= hi]  # an end on a boundary touches it: undecided
    if np.isnan(lo) or np.isnan(hi):
        return "inconclusive", "no interval (NaN)", (lo, hi)
    if crossed or grade(lo) != grade(hi):
        return ("inconclusive", f"95% interval [{lo:.3g}, {hi:.3g}] straddles "
                + ", ".join(f"{t:g}" for t in crossed), (lo, hi))
    return grade(lo), "", (lo, hi)


def flat_ratio(fvu: Sequence[float], nonlinear_fvu: Sequence[float]) -> float:
    """The nonlinear FVU's relative drop over the FVU's, narrowest to widest (NaN if the FVU does
    not fall): the number `nonlinear_flat` grades."""
    d_fvu, d_nl = relative_drop(fvu), relative_drop(nonlinear_fvu)
    return d_nl / d_fvu if d_fvu > 0 else float("nan")


def nonlinear_flat(fvu: Sequence[float], nonlinear_fvu: Sequence[float],
                   interval: tuple[float, float] | None = None) -> Verdict:
    """"Nonlinear FVU stays roughly flat as SAEs widen." fvu, nonlinear_fvu: [n_widths], by width;
    interval: 95% interval of `flat_ratio` (nonlinear FVU's relative drop / FVU's).

    reproduced: abs(ratio) <= FLAT_SHARE; partly: abs(ratio) < 1 (it falls less than the FVU); not
    reproduced otherwise, or when the FVU does not fall (no scaling to compare with); with an
    interval, inconclusive where it straddles a boundary (+-0.5, +-1)."""
    why = ("criterion: the nonlinear FVU's relative change is at most half the FVU's relative fall "
           "(partly: smaller than it)")
    if not relative_drop(fvu) > 0:
        return Verdict("not reproduced", why + "; here the FVU does not fall with width",
                       "the FVU does not fall with width")

    def grade(r: float) -> str:
        return "reproduced" if abs(r) <= FLAT_SHARE else "partly" if abs(r) < 1 else "not reproduced"

    verdict, note, ci = _graded(grade, flat_ratio(fvu, nonlinear_fvu), interval,
                                (-1.0, -FLAT_SHARE, FLAT_SHARE, 1.0))
    return Verdict(verdict, why, note, ci)


def at_fixed_l0(verdict: Verdict, l0: Sequence[float], target: float | Sequence[float]) -> Verdict:
    """A verdict whose premise is a fixed L0 (the paper's sweeps at one L0, or its comparisons at
    equal L0), for SAEs whose L0 is aimed at `target` (one for all, or one per SAE) but not fixed
    (JumpReLU): kept where every mean L0 is within L0_MATCH of its target, otherwise
    inconclusive (the compared SAEs then differ in L0 too), saying which."""
    values = _floats(l0, "l0")
    targets = np.broadcast_to(np.asarray(target, dtype=float), values.shape) if np.ndim(target) == 0 \
        else _floats(target, "target")
    if targets.shape != values.shape:
        raise ValueError(f"at_fixed_l0: {len(targets)} targets for {len(values)} L0 values")
    if not (np.isfinite(targets) & (targets > 0)).all():
        raise ValueError(f"at_fixed_l0: target must be finite numbers > 0, got {target!r}")
    off = np.abs(values / targets - 1.0)
    if (off <= L0_MATCH + 1e-12).all():  # the boundary counts as matched (float rounding aside)
        return verdict
    worst = int(off.argmax())
    said = (f"L0 {values[worst]:.1f} for the target {targets[worst]:g}, more than {100 * L0_MATCH:.0f}% off "
            f"({int((off > L0_MATCH + 1e-12).sum())} of {len(values)} SAEs): the SAEs differ in L0 too")
    return replace(verdict, verdict="inconclusive", why=verdict.why + f"; and L0 within {100 * L0_MATCH:.0f}% "
                   "of the target for every SAE", note="; ".join(n for n in (verdict.note, said) if n))


def vector_half(main_r2: float, sweep_r2: Sequence[float],
                interval: tuple[float, float] | None = None) -> Verdict:
    """"About half of the SAE error vector is linearly predictable." main_r2: the main SAE's
    per-dimension vector R^2 (interval: its 95% interval); sweep_r2: every SAE's of the sweep.
    reproduced: the main SAE within VECTOR_TOLERANCE of VECTOR_TARGET (its whole interval);
    partly: outside, but some SAE of the sweep is within; inconclusive: the interval straddles
    0.5 -+ 0.2."""
    near = np.abs(_floats(sweep_r2, "sweep_r2") - VECTOR_TARGET) <= VECTOR_TOLERANCE

    def grade(r: float) -> str:
        return ("reproduced" if abs(r - VECTOR_TARGET) <= VECTOR_TOLERANCE else
                "partly" if near.any() else "not reproduced")

    verdict, note, ci = _graded(grade, main_r2, interval,
                                (VECTOR_TARGET - VECTOR_TOLERANCE, VECTOR_TARGET + VECTOR_TOLERANCE))
    return Verdict(verdict, "criterion: |R^2 - 0.5| <= 0.2 for the main SAE (partly: for some SAE "
                            "of the sweep)", note, ci)


def norm_predictable(r2: Sequence[float], interval: tuple[float, float] | None = None) -> Verdict:
    """"More than 90% of the error's squared norm is linearly predictable." r2: held-out R^2 of
    ||SaeError||^2 from [x, 1], one per SAE; interval: 95% interval of their median.
    reproduced: median > NORM_R2; partly: > NORM_R2_PARTLY; inconclusive: the interval straddles one."""
    def grade(m: float) -> str:
        return "reproduced" if m > NORM_R2 else "partly" if m > NORM_R2_PARTLY else "not reproduced"

    verdict, note, ci = _graded(grade, _median(r2, "r2"), interval, (NORM_R2_PARTLY, NORM_R2))
    return Verdict(verdict, "criterion: median over the sweep > 0.9 (partly: > 0.7)", note, ci)


def same_tokens(r2_without: Sequence[float], interval: tuple[float, float] | None = None) -> Verdict:
    """"Larger SAEs struggle on the same tokens." r2_without: per width pair, the held-out R^2 of
    the larger SAE's per-token error norm from the smaller one's; interval: 95% interval of their
    median. Thresholds are ours (SAME_TOKENS_R2, _PARTLY); inconclusive where it straddles one."""
    def grade(m: float) -> str:
        return "reproduced" if m >= SAME_TOKENS_R2 else "partly" if m >= SAME_TOKENS_R2_PARTLY else "not reproduced"

    verdict, note, ci = _graded(grade, _median(r2_without, "r2_without"), interval,
                                (SAME_TOKENS_R2_PARTLY, SAME_TOKENS_R2))
    return Verdict(verdict, "criterion (ours, the paper gives no threshold): median R^2 >= 0.7 "
                            "(partly: >= 0.4)", note, ci)


def nonlinear_norm_helps(share_removed: Sequence[float], interval: tuple[float, float] | None = None) -> Verdict:
    """"The nonlinear error norm helps predict per-token scaling." share_removed: per width pair,
    the share of the remaining variance that adding ||NonlinearError_i|| removes. interval: the
    95% interval of their median (`scaling.headline_scores`); the verdict is then the grade of
    the whole interval, inconclusive where its ends grade differently."""
    s = _floats(share_removed, "share_removed")
    all_positive = bool((s > 0).all())

    def grade(med: float) -> str:
        return ("reproduced" if all_positive and med >= NONLINEAR_HELPS_SHARE else
                "partly" if med > 0 else "not reproduced")

    why = "criterion (ours): positive for every pair and >= 5% at the median (partly: median > 0)"
    # the 5% boundary matters only where every pair is positive
    bounds = (0.0, NONLINEAR_HELPS_SHARE) if all_positive else (0.0,)
    verdict, note, ci = _graded(grade, _median(s, "share_removed"), interval, bounds)
    return Verdict(verdict, why, note, ci)


def across_layers(verdicts: Sequence[str | Verdict]) -> Verdict:
    """A single-layer criterion applied at each layer: the common verdict if every layer agrees;
    partly where two decided layers disagree (whatever the undecided ones turn out to be);
    inconclusive where the decided layers agree but some layer is inconclusive (it could agree or
    not). The interval spans the layers' intervals where every layer has one."""
    words = [v.verdict if isinstance(v, Verdict) else str(v).split(" (")[0] for v in verdicts]
    if not words:
        raise ValueError("verdicts: expected one per layer, got none")
    why = "the single-layer criteria, applied at each layer"
    cis = [v.interval if isinstance(v, Verdict) else None for v in verdicts]
    interval = None if any(ci is None for ci in cis) else _span(np.asarray(cis, dtype=float))
    decided = {w for w in words if w != "inconclusive"}
    if len(decided) > 1:
        return Verdict("partly", why, interval=interval)
    undecided = words.count("inconclusive")
    if undecided and decided:
        return Verdict("inconclusive", why, f"{undecided} of {len(words)} layers inconclusive, the rest "
                       f"{decided.pop()}", interval)
    return Verdict(words[0], why, "every layer inconclusive" if undecided else "", interval)


# ---------------------------------------------------------------------------------------------
# Dark Matter: downstream, error SAEs, reducing the error, synthetic check


def downstream_proportional(ce_share: Sequence[float], variance_share: Sequence[float],
                            gap_intervals: Sequence[tuple[float, float]] | None = None) -> Verdict:
    """"The nonlinear error causes a share of the CE increase proportional to its size." Per width:
    the nonlinear error's share of the SAE's CE increase and of its FVU (a NaN CE share, where the
    SAE does not raise the CE, does not count). reproduced: abs(CE share - variance share) <=
    DOWNSTREAM_TOLERANCE at every width; partly: at half of them.

    gap_intervals: per width, the 95% interval of CE share - variance share
    (`downstream.part_shares`). A width then counts as proportional when its whole interval lies
    within +-DOWNSTREAM_TOLERANCE, as not when it lies wholly outside; the verdict is the one both
    readings of the straddling (or NaN-interval) widths give, else inconclusive. The interval
    reported spans the widths' intervals."""
    gap = _floats(ce_share, "ce_share") - _floats(variance_share, "variance_share")
    why = (f"criterion: |CE share - variance share| <= {DOWNSTREAM_TOLERANCE} at every width "
           "(partly: at half)")
    if gap_intervals is None:
        return Verdict(_counted(int((np.abs(gap) <= DOWNSTREAM_TOLERANCE).sum()), len(gap)), why)
    ci = np.asarray(gap_intervals, dtype=float).reshape(-1, 2)
    if len(ci) != len(gap):
        raise ValueError(f"downstream_proportional: {len(ci)} intervals for {len(gap)} widths")
    t = DOWNSTREAM_TOLERANCE
    surely = (ci[:, 0] >= -t) & (ci[:, 1] <= t)
    # a NaN gap (no CE share) does not count; a NaN interval around a finite gap (some resample
    # has no CE increase) leaves that width undecided
    possibly = ~((ci[:, 0] > t) | (ci[:, 1] < -t)) & ~np.isnan(gap)
    # the widths that count (a NaN gap does not) give the span and the undefined count
    return _two_readings(int(surely.sum()), int(possibly.sum()), len(gap), _counted, why,
                         f"widths' 95% intervals straddle +-{t}", ci[~np.isnan(gap)],
                         undefined_why="the SAE's CE increase is not above 0 on every resample of the "
                                       "contexts, so its CE share is unbounded; more contexts would bound it")


def _two_readings(n_sure: int, n_possible: int, n: int, grade: Callable[[int, int], str], why: str,
                  straddle_note: str, items: np.ndarray, reported: tuple[float, float] | None = None, *,
                  undefined_why: str = "NaN on some resample") -> Verdict:
    """A counted criterion judged on intervals: grade(n_sure, n) where the straddling points all
    fail, grade(n_possible, n) where they all pass; the same word -> that verdict, else
    inconclusive (noting how many straddle). items: the judged points' 95% intervals [m, 2];
    the verdict's interval is `reported`, else their span (`_span`: None if one is NaN); the
    note counts the undefined ones, decided or not."""
    items = np.asarray(items, dtype=float).reshape(-1, 2)
    interval = reported if reported is not None else _span(items)
    n_undefined = int(np.isnan(items).any(1).sum())
    undefined = (f"{n_undefined} of {len(items)} 95% intervals undefined ({undefined_why})"
                 if n_undefined else "")
    low, high = grade(n_sure, n), grade(n_possible, n)
    if low == high:
        return Verdict(low, why, undefined, interval=interval)
    note = "; ".join(p for p in (f"{n_possible - n_sure} of {n} {straddle_note}", undefined) if p)
    return Verdict("inconclusive", why, note, interval)


def error_saes_worse(fvu_linear: Sequence[float], fvu_nonlinear: Sequence[float],
                     diff_intervals: Sequence[tuple[float, float]] | None = None) -> Verdict:
    """"SAEs trained on the nonlinear error are worse than on the linear error." Per k: held-out
    FVU of the SAE on each part. reproduced: higher on the nonlinear part at every k; partly: at half.

    diff_intervals: per k, the 95% interval of FVU (nonlinear) - FVU (linear) (`intervals.r2_bootstrap`
    over held-out contexts). A k counts as worse when its interval lies above 0, as not when below
    or at 0; the verdict is the one both readings of the straddling k give, else inconclusive."""
    why = "criterion: higher held-out FVU on the nonlinear error at every k (partly: at half)"
    worse = _floats(fvu_nonlinear, "fvu_nonlinear") > _floats(fvu_linear, "fvu_linear")
    if diff_intervals is None:
        return Verdict(_counted(int(worse.sum()), len(worse)), why)
    ci = np.asarray(diff_intervals, dtype=float).reshape(-1, 2)
    if len(ci) != len(worse):
        raise ValueError(f"error_saes_worse: {len(ci)} intervals for {len(worse)} k")
    return _two_readings(int((ci[:, 0] > 0).sum()), int((~(ci[:, 1] <= 0)).sum()), len(worse), _counted,
                         why, "k's 95% intervals straddle 0", ci)


def pursuit_slight(relative_decrease: Sequence[float],
                   intervals: Sequence[tuple[float, float]] | None = None) -> Verdict:
    """"Gradient pursuit reduces the nonlinear error only very slightly." Per width: 1 - nonlinear
    FVU with pursuit / with the SAE's encoder (intervals: each one's 95% interval). reproduced:
    0 <= decrease < PURSUIT_SLIGHT at every width; partly: abs(change) below it everywhere (but
    not a decrease everywhere). With intervals, each width is judged on its whole interval: not
    reproduced as soon as one width's interval lies beyond +-PURSUIT_SLIGHT, else inconclusive
    where an interval straddles 0 or PURSUIT_SLIGHT."""
    r = _floats(relative_decrease, "relative_decrease")
    if intervals is not None:
        ci = np.asarray(intervals, dtype=float).reshape(-1, 2)
        if len(ci) != len(r):
            raise ValueError(f"pursuit_slight: {len(ci)} intervals for {len(r)} widths")
        if (ci[:, 0] >= PURSUIT_SLIGHT).any() or (ci[:, 1] <= -PURSUIT_SLIGHT).any():  # clearly not slight
            return Verdict("not reproduced", _PURSUIT_WHY, interval=_span(ci))
        straddles = [(lo, hi) for lo, hi in ci if not (0 <= lo and hi < PURSUIT_SLIGHT)
                     and not (-PURSUIT_SLIGHT < lo and hi < 0)]
        if straddles or np.isnan(ci).any():
            return Verdict("inconclusive", _PURSUIT_WHY, f"{len(straddles)} of {len(ci)} widths' 95% intervals "
                           f"straddle 0 or {100 * PURSUIT_SLIGHT:.0f}%", _span(ci))
        r = ci.mean(1)  # every interval lies on one side of each boundary
    if ((r >= 0) & (r < PURSUIT_SLIGHT)).all():
        return Verdict("reproduced", _PURSUIT_WHY, interval=_span(ci) if intervals is not None else None)
    if (np.abs(r) < PURSUIT_SLIGHT).all():
        return Verdict("partly", _PURSUIT_WHY, "the change is slight, but not a decrease at every width",
                       _span(ci) if intervals is not None else None)
    return Verdict("not reproduced", _PURSUIT_WHY, interval=_span(ci) if intervals is not None else None)


def _span(ci: np.ndarray) -> tuple[float, float] | None:
    """The interval reported for several: from the lowest lower end to the highest upper end;
    None where one of them is undefined (NaN), as the span of the rest would understate it."""
    if len(ci) == 0 or np.isnan(ci).any():
        return None
    return float(ci[:, 0].min()), float(ci[:, 1].max())


_PURSUIT_WHY = (f"criterion: 0 <= decrease < {100 * PURSUIT_SLIGHT:.0f}% at every width "
                "(partly: |change| below it)")


def earlier_components(all_three: float, single: Sequence[float], pursuit: float,
                       interval: tuple[float, float] | None = None) -> Verdict:
    """"Earlier components' SAE outputs reduce the nonlinear error more than pursuit." Relative
    reductions of the nonlinear FVU: by the three component SAEs together, by each alone, by
    gradient pursuit. reproduced: together > 0 and > pursuit; partly: some single one > pursuit.

    interval: the 95% interval of together - pursuit (`scaling.reduction_difference`). Together
    then beats pursuit when it lies above 0, does not when at or below; the verdict is the one
    both readings of a straddling interval give, else inconclusive (the singles are compared on
    their point values)."""
    def verdict(beats: bool) -> Verdict:
        if beats and all_three > 0:
            return Verdict("reproduced", _EARLIER_WHY, interval=interval)
        if (_floats(single, "single") > pursuit).any():
            return Verdict("partly", _EARLIER_WHY, "only some component SAEs beat pursuit", interval)
        return Verdict("not reproduced", _EARLIER_WHY, interval=interval)

    if interval is None:
        return verdict(all_three > pursuit)
    lo, hi = float(interval[0]), float(interval[1])
    if np.isnan(lo) or np.isnan(hi):
        return Verdict("inconclusive", _EARLIER_WHY, "the 95% interval of together - pursuit is undefined "
                       "(NaN on some resample)")
    low, high = verdict(lo > 0), verdict(not hi <= 0)
    if low.verdict == high.verdict:
        return low
    return Verdict("inconclusive", _EARLIER_WHY, f"the 95% interval [{lo:.3g}, {hi:.3g}] of together - "
                   f"pursuit straddles 0: {low.verdict} or {high.verdict}", interval)


_EARLIER_WHY = ("criterion: the three SAE outputs together reduce it, by more than pursuit "
                "(partly: some single one beats pursuit)")


def synthetic_noise(activation_to_linear: float, reconstruction_to_nonlinear: float,
                    activation_to_nonlinear: float, reconstruction_to_linear: float,
                    intervals: tuple[tuple[float, float], tuple[float, float]] | None = None) -> Verdict:
    """"Planted noise lands where it should": correlations of each planted noise scale with the
    estimated linear / nonlinear error. reproduced: both diagonal > SYNTHETIC_DIAGONAL and both
    abs(off-diagonal) < SYNTHETIC_OFF_DIAGONAL; partly: both diagonal > SYNTHETIC_DIAGONAL_PARTLY.

    intervals: the 95% intervals of the smaller diagonal and the larger abs(off-diagonal)
    (`synthetic.NoiseCorrelation.diagonal_intervals`); the verdict is then the one both the worst
    (lowest diagonal, highest off-diagonal) and the best ends give, else inconclusive. The
    interval reported is the diagonal's."""
    def grade(diag: float, off: float) -> str:
        return ("reproduced" if diag > SYNTHETIC_DIAGONAL and off < SYNTHETIC_OFF_DIAGONAL else
                "partly" if diag > SYNTHETIC_DIAGONAL_PARTLY else "not reproduced")

    why = "criterion: both diagonal correlations > 0.8 and both off-diagonal |r| < 0.5"
    diag = min(activation_to_linear, reconstruction_to_nonlinear)
    off = max(abs(activation_to_nonlinear), abs(reconstruction_to_linear))
    if intervals is None:
        return Verdict(grade(diag, off), why)
    (d_lo, d_hi), (o_lo, o_hi) = ((float(a), float(b)) for a, b in intervals)
    worst, best = grade(d_lo, o_hi), grade(d_hi, o_lo)  # NaN compares false: the worst grade
    if worst == best and not np.isnan([d_lo, d_hi, o_lo, o_hi]).any():
        return Verdict(worst, why, interval=(d_lo, d_hi))
    return Verdict("inconclusive", why, f"the intervals (diagonal [{d_lo:.3g}, {d_hi:.3g}], off-diagonal "
                   f"[{o_lo:.3g}, {o_hi:.3g}]) allow {worst} or {best}", (d_lo, d_hi))


# ---------------------------------------------------------------------------------------------
# Mutual / Feature Choice


def zipf_law(r2_all: float, r2_middle: float,
             intervals: tuple[tuple[float, float], tuple[float, float]] | None = None) -> Verdict:
    """"Feature densities follow a Zipf law." R^2 of the log-log fit over all live ranks and of
    the fit on the middle ranks (NaN: too few middle ranks). reproduced: both thresholds; partly: one.

    intervals: the 95% intervals of the two (`zipf.zipf_bootstrap`). A threshold is then met
    when its whole interval lies above it, missed when wholly below (or the R^2 is NaN);
    the verdict is the one both readings of a straddling (or NaN) interval give, else
    inconclusive. The interval reported is the overall R^2's."""
    why = "criterion: overall R^2 >= 0.95 and middle R^2 >= 0.98 (partly: one of them)"
    values, thresholds = np.array([r2_all, r2_middle], dtype=float), np.array([ZIPF_R2_ALL, ZIPF_R2_MIDDLE])
    if intervals is None:
        return Verdict(_by_count(int((values >= thresholds).sum()), 2), why)
    ci = np.asarray(intervals, dtype=float).reshape(2, 2)
    # as `_graded`: an interval that touches a threshold is undecided; a NaN bound too
    sure = (ci[:, 0] > thresholds) & ~np.isnan(values)
    possibly = ~(ci[:, 1] < thresholds) & ~np.isnan(values)
    return _two_readings(int(sure.sum()), int(possibly.sum()), 2, _by_count, why,
                         "R^2 95% intervals straddle their threshold", ci, tuple(ci[0]))


def beats_at_equal_l0(deltas: Sequence[float]) -> bool:
    """An SAE family is better than the reference at equal L0: its points' deltas (positive =
    better, NaN = out of the reference curve's reach) have a mean > 0 and more than BEATS_MOST of
    them are > 0."""
    d = np.asarray(deltas, dtype=float).reshape(-1)
    d = d[~np.isnan(d)]
    return bool(d.size > 0 and d.mean() > 0 and (d > 0).mean() > BEATS_MOST)


def mc_downstream(mutual_choice: Sequence[float], feature_choice_finetuned: Sequence[float],
                  intervals: tuple[tuple[float, float], tuple[float, float]] | None = None) -> Verdict:
    """"Mutual Choice and fine-tuned Feature Choice recover more downstream loss than TopK at equal
    L0." Per family: delta CE recovered against TopK's curve read at each point's L0 (NaN where it
    is out of reach). reproduced: both families `beats_at_equal_l0`; partly: one; inconclusive if a
    family has no comparable point.

    intervals: per family, the 95% interval of its mean delta (`downstream.gain_at_equal_l0`). A
    family then beats TopK when most of its points are > 0 and the interval lies above 0, does
    not when fewer are or the interval lies at or below 0; the verdict is the one both readings of
    a straddling interval give, else inconclusive. The interval reported is Mutual Choice's."""
    why = ("criterion: mean delta CE recovered > 0 and most points > 0 vs TopK's curve read at equal "
           "L0, for both")
    families = [np.asarray(f, dtype=float).reshape(-1) for f in (mutual_choice, feature_choice_finetuned)]
    if any(np.isnan(f).all() for f in families):
        return Verdict("inconclusive", why, "no comparable point")
    if intervals is None:
        return Verdict(_by_count(sum(beats_at_equal_l0(f) for f in families), 2), why)
    ci = np.asarray(intervals, dtype=float).reshape(2, 2)
    most = np.array([(f[~np.isnan(f)] > 0).mean() > BEATS_MOST for f in families])
    sure, possibly = most & (ci[:, 0] > 0), most & ~(ci[:, 1] <= 0)
    return _two_readings(int(sure.sum()), int(possibly.sum()), 2, _by_count, why,
                         "families' 95% intervals of the mean delta straddle 0", ci, tuple(ci[0]))


def mc_fewer_dead(dead_no_aux: Sequence[int], dead_mutual_choice_zipf: int,
                  dead_feature_choice: int) -> Verdict:
    """"Mutual Choice with aux_zipf_loss and Feature Choice have fewer dead latents." Counts of
    latents dead on the test store (same width, same tokens) of the SAEs trained without an
    auxiliary loss (TopK, Mutual Choice) and of the two. One of the two has fewer when the 95%
    interval of its dead-latent rate ratio to every no-aux SAE lies below 1 (exact,
    `intervals.rate_ratio_interval`), more when above 1 for one of them. reproduced: both fewer;
    partly: one; not reproduced: neither, and one clearly more; inconclusive: no clear difference
    (so also when the no-aux SAEs have no dead latents). The interval is Mutual Choice (aux_zipf)'s
    ratio to the no-aux SAE with the fewest dead latents."""
    base = _counts(dead_no_aux, "dead_no_aux")
    pair = _counts([dead_mutual_choice_zipf, dead_feature_choice], "dead_mutual_choice_zipf, dead_feature_choice")
    why = ("criterion: for both, the 95% interval of the dead-latent rate ratio to each no-aux SAE below 1 "
           "(exact, from the counts; partly: one; inconclusive: no clear difference)")
    sides = [[side(rate_ratio_interval(c, b), 1.0) for b in base] for c in pair]
    fewer = sum(all(s == "below" for s in row) for row in sides)
    more = any("above" in row for row in sides)
    interval = rate_ratio_interval(pair[0], min(base))
    if fewer:
        return Verdict(_by_count(fewer, 2), why, interval=interval)
    if more:
        return Verdict("not reproduced", why, interval=interval)
    note = "no dead latents without an aux loss" if max(base) == 0 else "no clear difference in the counts"
    return Verdict("inconclusive", why, note, interval=interval)


def more_latents_for_harder(rho: float, p_value: float) -> bool:
    """One series: Spearman rho of latents per token against difficulty > HARD_TOKENS_RHO with
    p < HARD_TOKENS_P."""
    return bool(rho > HARD_TOKENS_RHO and p_value < HARD_TOKENS_P)


def hard_tokens(rho: Sequence[float], p_value: Sequence[float],
                intervals: Sequence[tuple[float, float]] | None = None) -> Verdict:
    """"Under adaptive allocation, harder tokens get more latents." One (rho, p) per series (SAE x
    inference mode). reproduced: `more_latents_for_harder` in every series; partly: in some.

    intervals: per series, the 95% context-bootstrap interval of rho (`intervals.spearman_bootstrap`;
    tokens of one context are not independent, so the p-value alone overstates the evidence). A
    series then shows it when its whole interval lies above HARD_TOKENS_RHO (and p < HARD_TOKENS_P),
    not when the interval lies at or below it; the verdict is the one both readings of the
    straddling series give, else inconclusive."""
    why = "criterion: Spearman rho > 0.1 with p < 0.01 in every series (partly: in some)"
    r, p = _floats(rho, "rho"), _floats(p_value, "p_value")
    if len(r) != len(p):
        raise ValueError(f"hard_tokens: {len(r)} rho values but {len(p)} p-values")
    shows = [more_latents_for_harder(a, b) for a, b in zip(r, p)]
    if intervals is None:
        return Verdict(_by_count(sum(shows), len(shows)), why)
    ci = np.asarray(intervals, dtype=float).reshape(-1, 2)
    if len(ci) != len(r):
        raise ValueError(f"hard_tokens: {len(ci)} intervals for {len(r)} series")
    significant = p < HARD_TOKENS_P
    sure = int((significant & (ci[:, 0] > HARD_TOKENS_RHO)).sum())
    possible = int((significant & ~(ci[:, 1] <= HARD_TOKENS_RHO)).sum())
    return _two_readings(sure, possible, len(r), _by_count, why + "; judged on each rho's 95% interval",
                         f"series' 95% intervals straddle {HARD_TOKENS_RHO}", ci)


# ---------------------------------------------------------------------------------------------
# g-SAEs


def gsae_faithful(ce_recovered_gsae: Sequence[float], ce_recovered_topk: Sequence[float],
                  kl_gsae: Sequence[float], kl_topk: Sequence[float],
                  ce_diff_intervals: Sequence[tuple[float, float]] | None = None,
                  kl_diff_intervals: Sequence[tuple[float, float]] | None = None) -> Verdict:
    """"g-SAEs are more faithful downstream than TopK at equal k." Per k: CE loss recovered and KL
    of the spliced g-SAE (selecting with the gradient) and TopK. reproduced: higher CE recovered and
    lower KL at every k; partly: either at some k.

    With the 95% intervals of the differences g-SAE - TopK per k (`downstream.compare_splices`,
    paired over the same contexts; both or neither): a k counts as better on a metric when its
    interval lies wholly on the better side of 0; the verdict is the one both readings of the
    straddling intervals give, else inconclusive. The interval reported spans the CE-recovered
    differences' intervals."""
    ce = _floats(ce_recovered_gsae, "ce_recovered_gsae") - _floats(ce_recovered_topk, "ce_recovered_topk")
    kl = _floats(kl_gsae, "kl_gsae") - _floats(kl_topk, "kl_topk")
    if len(ce) != len(kl):
        raise ValueError(f"gsae_faithful: {len(ce)} CE-recovered values per SAE but {len(kl)} KL values")

    def grade(ce_better: np.ndarray, kl_better: np.ndarray) -> str:
        both, either = int((ce_better & kl_better).sum()), int((ce_better | kl_better).sum())
        return "reproduced" if both == len(ce) else "partly" if either > 0 else "not reproduced"

    if (ce_diff_intervals is None) != (kl_diff_intervals is None):
        raise ValueError("gsae_faithful: give both ce_diff_intervals and kl_diff_intervals, or neither")
    if ce_diff_intervals is None:
        return Verdict(grade(ce > 0, kl < 0), _FAITHFUL_WHY + "; point estimates on the held-out contexts")
    ce_ci = np.asarray(ce_diff_intervals, dtype=float).reshape(-1, 2)
    kl_ci = np.asarray(kl_diff_intervals, dtype=float).reshape(-1, 2)
    if len(ce_ci) != len(ce) or len(kl_ci) != len(ce):
        raise ValueError(f"gsae_faithful: {len(ce_ci)} / {len(kl_ci)} intervals for {len(ce)} k")
    sure = grade(ce_ci[:, 0] > 0, kl_ci[:, 1] < 0)
    possible = grade(~(ce_ci[:, 1] <= 0), ~(kl_ci[:, 0] >= 0))  # NaN ends stay possible
    why = _FAITHFUL_WHY + "; each k judged on the 95% intervals of the differences (paired over contexts)"
    if sure == possible:
        return Verdict(sure, why, interval=_span(ce_ci))
    return Verdict("inconclusive", why, f"intervals straddle 0: {sure} or {possible}", _span(ce_ci))


_FAITHFUL_WHY = "criterion: higher CE recovered and lower KL at every k (partly: either at some k)"


def gsae_fewer_dead(dead_gsae: Sequence[int], dead_topk: Sequence[int]) -> Verdict:
    """"g-SAEs have fewer dead latents than TopK." Per k: the counts of latents dead on the test
    store (same width, same tokens). At each k the g-SAE has fewer when the 95% interval of the
    rate ratio g / TopK (`intervals.rate_ratio_interval`) lies below 1, more when above, else no
    clear difference. reproduced: fewer at every k; partly: at some; not reproduced: at none while
    some k differ clearly; inconclusive: no k differs clearly. The interval is the ratio's over
    all k pooled."""
    g, t = _counts(dead_gsae, "dead_gsae"), _counts(dead_topk, "dead_topk")
    if len(g) != len(t):
        raise ValueError(f"gsae_fewer_dead: {len(g)} g-SAE counts but {len(t)} TopK counts")
    sides = [side(rate_ratio_interval(a, b), 1.0) for a, b in zip(g, t)]
    pooled = rate_ratio_interval(sum(g), sum(t))
    why = ("criterion: at every k, the 95% interval of the dead-latent rate ratio g-SAE / TopK "
           "(exact, from the counts) below 1 (partly: at some k; inconclusive: no k clear)")
    fewer, clear = sides.count("below"), len(sides) - sides.count("straddles")
    if clear == 0:
        return Verdict("inconclusive", why, "no k with a clear difference: too few dead latents", interval=pooled)
    verdict = "reproduced" if fewer == len(g) else "partly" if fewer else "not reproduced"
    return Verdict(verdict, why, interval=pooled)


def _counts(values: Sequence[int], name: str) -> list[int]:
    a = _floats(values, name)
    if (a < 0).any() or (a != np.round(a)).any():
        raise ValueError(f"{name}: expected whole numbers >= 0 (counts), got {a.tolist()}")
    return [int(v) for v in a]


def compare_means(mean_a: float, sem_a: float, mean_b: float, sem_b: float) -> str:
    """"higher" / "lower" if mean_a - mean_b is beyond CLEAR_SE standard errors of the difference
    (independent samples), else "no clear difference": decided on `mean_difference_interval`."""
    lo, hi = mean_difference_interval(mean_a, sem_a, mean_b, sem_b)
    return "higher" if lo > 0 else "lower" if hi < 0 else "no clear difference"


def mean_difference_interval(mean_a: float, sem_a: float, mean_b: float, sem_b: float) -> tuple[float, float]:
    """mean_a - mean_b -+ CLEAR_SE standard errors of the difference: the interval `compare_means`
    decides on (independent samples; ~95% for a normal difference)."""
    diff, se = mean_a - mean_b, (sem_a ** 2 + sem_b ** 2) ** 0.5
    return diff - CLEAR_SE * se, diff + CLEAR_SE * se


def gsae_steering(calls: Sequence[str], interval: tuple[float, float] | None = None) -> Verdict:
    """"g-SAE latents steer the model more effectively." calls: `compare_means` of g-SAE vs TopK
    latents on each steering metric. reproduced: higher on every metric; partly: higher on one and
    lower on none. interval: that of the first metric's difference (`mean_difference_interval`),
    reported with the verdict (the calls already decide on it)."""
    why = ("criterion: difference of means beyond 2 standard errors on both metrics (partly: on one, "
           "and lower on none)")
    if not calls:
        raise ValueError("calls: expected one per steering metric, got none")
    if all(c == "higher" for c in calls):
        return Verdict("reproduced", why, interval=interval)
    if "higher" in calls and "lower" not in calls:
        return Verdict("partly", why, interval=interval)
    unclear = all(c == "no clear difference" for c in calls)
    return Verdict("not reproduced", why, "no clear difference" if unclear else "", interval)


def gsae_interpretable(difference: float, interval: tuple[float, float]) -> Verdict:
    """"g-SAE latents are as interpretable as TopK's", on our proxy (`latents.token_concentration`:
    the share of a latent's top held-out activations on its most frequent token; the paper scored
    LLM-written explanations, which need a hub model). difference: mean over latents, g-SAE minus
    TopK, with its 95% bootstrap interval (latents resampled). A non-inferiority reading:
    reproduced when the interval lies above -INTERPRETABLE_MARGIN (not worse by more than the
    margin; better counts), not reproduced when it lies below, else inconclusive."""
    why = (f"criterion (our proxy, token concentration of the top activations): the 95% interval "
           f"of g-SAE minus TopK above -{INTERPRETABLE_MARGIN} (not reproduced: below it)")
    if np.isnan(difference):
        return Verdict("inconclusive", why, "no difference measured", interval=interval)
    where = side(interval, -INTERPRETABLE_MARGIN)
    if where == "straddles":
        return Verdict("inconclusive", why, "the interval straddles the margin", interval=interval)
    return Verdict("reproduced" if where == "above" else "not reproduced", why, interval=interval)


# ---------------------------------------------------------------------------------------------
# Across the papers


def seed_noise(std_a: float, std_b: float, n_seeds: int, reference: float) -> float:
    """The size below which a difference between two SAE types is training noise: SEED_NOISE_STD x
    the larger of their standard deviations over seeds, or, with one seed (no spread measured),
    ONE_SEED_NOISE x the reference value (a guess, and said so where it is used)."""
    if n_seeds > 1:
        return SEED_NOISE_STD * max(std_a, std_b)
    return ONE_SEED_NOISE * reference


def effect(delta: float, noise: float) -> str:
    """How a quantity moves from one SAE type to another: "shrinks" / "grows" beyond the noise,
    else "leaves unchanged"."""
    return "shrinks" if delta < -noise else "grows" if delta > noise else "leaves unchanged"


def effect_over_seeds(values: Sequence[float], reference: Sequence[float]) -> tuple[str, tuple[float, float]]:
    """How a quantity moves from the reference SAE type to another, from their values over
    training seeds (>= 2 each): "shrinks" / "grows" when the 95% interval of the difference of
    the means (`intervals.difference_interval`) lies below / above 0, else "no clear change".
    -> (word, interval)."""
    from sae_repro.intervals import difference_interval

    lo, hi = difference_interval(values, reference)
    return ("shrinks" if hi < 0 else "grows" if lo > 0 else "no clear change"), (lo, hi)
