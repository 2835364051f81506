"""Selection rules on small hand-made matrices with known answers."""

from __future__ import annotations

import pytest
import torch

from sae_repro.sparsity import (
    RULES,
    ThresholdEMA,
    feature_choice,
    gradient_topk,
    jumprelu,
    mutual_choice,
    relu,
    select,
    threshold_select,
    topk,
    zipf_capacities,
)

T = torch.tensor


def nnz_rows(codes: torch.Tensor) -> torch.Tensor:
    return (codes != 0).sum(-1)


def nnz_cols(codes: torch.Tensor) -> torch.Tensor:
    return (codes != 0).sum(0)


# a call of each rule with its budget parameters, for the shared properties
CALLS = {
    "topk": lambda pre: topk(pre, 2),
    "mutual_choice": lambda pre: mutual_choice(pre, 2),
    "feature_choice": lambda pre: feature_choice(pre, 2),
    "feature_choice_caps": lambda pre: feature_choice(pre, T([3, 1, 0, 2, 1])),
    "gradient_topk": lambda pre: gradient_topk(pre, torch.ones_like(pre), 2, 1.0),
    "jumprelu": lambda pre: jumprelu(pre, 0.1),
    "relu": relu,
    "threshold_select": lambda pre: threshold_select(pre, T([0.0, 0.1, 0.2, 0.3, 0.4])),
}


# ----------------------------------------------------------------------------- known answers


def test_topk_known_answer():
    pre = T([[3.0, 1.0, 2.0, -1.0],
             [-2.0, -1.0, 5.0, 0.5]])
    assert torch.equal(topk(pre, 2), T([[3.0, 0.0, 2.0, 0.0],
                                        [0.0, 0.0, 5.0, 0.5]]))


def test_topk_budget_and_nonpositive_kept_entries_read_zero():
    pre = T([[1.0, -1.0, -2.0, -3.0]])
    assert torch.equal(topk(pre, 2), T([[1.0, 0.0, 0.0, 0.0]]))  # -1 is kept but relu'd to 0
    pos = torch.rand(16, 10) + 0.1
    assert (nnz_rows(topk(pos, 3)) == 3).all()  # exactly k when a row has >= k positive entries
    mixed = torch.randn(64, 10)
    assert (nnz_rows(topk(mixed, 3)) <= 3).all()


def test_mutual_choice_gives_one_token_many_latents_and_another_none():
    pre = T([[9.0, 8.0, 7.0, 6.0],
             [1.0, 0.5, 0.2, 0.1]])
    codes = mutual_choice(pre, 2)  # budget M = 2 * 2 = 4, all taken by token 0
    assert torch.equal(codes, T([[9.0, 8.0, 7.0, 6.0], [0.0, 0.0, 0.0, 0.0]]))
    assert nnz_rows(codes).tolist() == [4, 0]


def test_mutual_choice_is_batch_topk():
    pre = torch.randn(32, 20)
    k = 3
    codes = mutual_choice(pre, k)
    assert int((codes != 0).sum()) <= k * 32
    kth = pre.flatten().sort(descending=True).values[k * 32 - 1]
    assert torch.equal(codes != 0, (pre >= kth) & (pre > 0))


def test_feature_choice_known_answer():
    pre = T([[5.0, 1.0],
             [4.0, 2.0],
             [3.0, 3.0]])
    assert torch.equal(feature_choice(pre, 1), T([[5.0, 0.0], [0.0, 0.0], [0.0, 3.0]]))
    assert torch.equal(feature_choice(pre, 2), T([[5.0, 0.0], [4.0, 2.0], [0.0, 3.0]]))


def test_feature_choice_budget_per_column():
    codes = feature_choice(torch.randn(40, 12), 5)
    assert (nnz_cols(codes) <= 5).all()
    assert (nnz_cols(feature_choice(torch.rand(40, 12) + 0.1, 5)) == 5).all()


def test_feature_choice_per_latent_capacities():
    pre = torch.rand(6, 4) + 0.1
    caps = T([3, 0, 1, 6])
    assert nnz_cols(feature_choice(pre, caps)).tolist() == [3, 0, 1, 6]
    # the kept tokens are each latent's largest
    codes = feature_choice(pre, caps)
    assert torch.equal(codes[:, 0] != 0, pre[:, 0] >= pre[:, 0].sort(descending=True).values[2])
    # capacities above n_tokens are clamped to the batch; all-zero capacities give zeros
    assert nnz_cols(feature_choice(pre, T([100, 1, 1, 1]))).tolist() == [6, 1, 1, 1]
    assert torch.equal(feature_choice(pre, torch.zeros(4, dtype=torch.long)), torch.zeros(6, 4))


def test_zipf_capacities():
    caps = zipf_capacities(100, 1000)
    assert caps.dtype == torch.long and caps.shape == (100,)
    assert int(caps.sum()) == 1000
    assert (caps >= 1).all() and (caps[:-1] >= caps[1:]).all() and caps[0] > caps[-1]
    assert caps[0] / caps[9] == pytest.approx(10, rel=0.1)  # rank^-1
    assert torch.equal(zipf_capacities(10, 50, exponent=0.0), torch.full((10,), 5))
    capped = zipf_capacities(100, 1000, max_capacity=20)
    assert int(capped.sum()) == 1000 and int(capped.max()) == 20 and (capped[:-1] >= capped[1:]).all()
    assert torch.equal(zipf_capacities(10, 3), torch.ones(10, dtype=torch.long))  # each >= 1 wins


def test_gradient_topk_beta_zero_is_topk():
    pre, grad = torch.randn(32, 16), torch.randn(32, 16)
    assert torch.equal(gradient_topk(pre, grad, 4, 0.0), topk(pre, 4))


def test_gradient_topk_large_gradient_promotes_small_latent():
    pre = T([[5.0, 4.0, 0.5, -1.0]])
    grad = T([[0.0, 0.0, 100.0, 1000.0]])
    # scores: 5, 4, 50.5, -1001 -> latent 2 wins; its value is relu(pre)=0.5, not the score
    assert torch.equal(gradient_topk(pre, grad, 1, 1.0), T([[0.0, 0.0, 0.5, 0.0]]))
    # a negative pre is pushed further down by a large gradient, never promoted
    assert torch.equal(gradient_topk(pre, grad, 2, 1.0), T([[5.0, 0.0, 0.5, 0.0]]))


def test_jumprelu_scalar_and_per_latent():
    pre = T([[0.5, 1.5, 2.5], [3.0, 0.2, -1.0]])
    assert torch.equal(jumprelu(pre, 1.0), T([[0.0, 1.5, 2.5], [3.0, 0.0, 0.0]]))
    assert torch.equal(jumprelu(pre, T([0.4, 0.1, 3.0])), T([[0.5, 1.5, 0.0], [3.0, 0.2, 0.0]]))
    assert torch.equal(jumprelu(pre, 1.5), T([[0.0, 0.0, 2.5], [3.0, 0.0, 0.0]]))  # strict >


def test_relu():
    assert torch.equal(relu(T([[-1.0, 0.0, 2.0]])), T([[0.0, 0.0, 2.0]]))


# ----------------------------------------------------------------------------- shared properties


@pytest.mark.parametrize("name", list(CALLS))
def test_nonpositive_input_gives_zero_codes(name):
    pre = -torch.rand(4, 5)
    pre[0] = 0.0
    assert torch.equal(CALLS[name](pre), torch.zeros(4, 5))


@pytest.mark.parametrize("name", list(CALLS))
def test_codes_are_relu_pre_or_zero(name):
    pre = torch.randn(8, 5)
    codes = CALLS[name](pre)
    assert codes.shape == pre.shape and codes.dtype == pre.dtype
    assert torch.all((codes == 0) | (codes == pre.relu()))


def test_ties_are_deterministic_and_within_budget():
    row = torch.ones(3, 8)
    for fn, count, expect in [
        (lambda p: topk(p, 3), nnz_rows, [3, 3, 3]),
        (lambda p: mutual_choice(p, 3), lambda c: [int((c != 0).sum())], [9]),
        (lambda p: feature_choice(p, 2), nnz_cols, [2] * 8),
        (lambda p: gradient_topk(p, torch.zeros_like(p), 3, 1.0), nnz_rows, [3, 3, 3]),
    ]:
        a, b = fn(row), fn(row)
        assert torch.equal(a, b)
        assert list(map(int, count(a))) == expect


@pytest.mark.parametrize("name", ["topk", "mutual_choice", "feature_choice", "feature_choice_caps",
                                  "gradient_topk", "jumprelu", "relu"])
def test_gradient_is_one_at_kept_positive_entries(name):
    pre = torch.randn(8, 5, requires_grad=True)
    codes = CALLS[name](pre)
    codes.sum().backward()
    assert torch.equal(pre.grad, (codes > 0).float())


# ----------------------------------------------------------------------------- dispatch


def test_select_dispatches_by_name():
    pre = torch.randn(6, 8)
    assert set(RULES) == {"topk", "mutual_choice", "feature_choice", "gradient_topk", "jumprelu", "relu"}
    assert torch.equal(select("topk", pre, k=2), topk(pre, 2))
    assert torch.equal(select("feature_choice", pre, m=T([1] * 8)), feature_choice(pre, 1))
    assert torch.equal(RULES["mutual_choice"](pre, k=2), mutual_choice(pre, 2))


def test_unknown_rule_lists_valid_names():
    with pytest.raises(ValueError, match="unknown sparsity rule 'batchtop'.*feature_choice.*topk"):
        select("batchtop", torch.randn(2, 3))


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_pre_rejected(bad):
    pre = torch.randn(3, 4)
    pre[1, 2] = bad
    for fn in (lambda p: topk(p, 1), lambda p: mutual_choice(p, 1), lambda p: feature_choice(p, 1),
               relu, lambda p: jumprelu(p, 0.0)):
        with pytest.raises(ValueError, match="NaN"):
            fn(pre)


def test_validate_false_skips_checks():
    pre = torch.randn(3, 4)
    pre[0, 0] = float("nan")
    topk(pre, 2, validate=False)  # no error: the caller vouched for the input


def test_k_out_of_range():
    pre = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"k=5 is larger than the number of latents n_latents=4"):
        topk(pre, 5)
    with pytest.raises(ValueError, match=r"k=5 is larger than the number of latents n_latents=4"):
        mutual_choice(pre, 5)
    with pytest.raises(ValueError, match=r"k=0"):
        topk(pre, 0)
    with pytest.raises(ValueError, match=r"k=-1"):
        gradient_topk(pre, pre, -1, 1.0)
    with pytest.raises(TypeError, match="k must be an int"):
        topk(pre, 2.0)


def test_m_out_of_range():
    pre = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"m=4 is larger than the number of tokens .* n_tokens=3"):
        feature_choice(pre, 4)
    with pytest.raises(ValueError, match=r"m=0"):
        feature_choice(pre, 0)
    with pytest.raises(ValueError, match=r"shape \[n_latents\]"):
        feature_choice(pre, T([1, 1, 1]))
    with pytest.raises(ValueError, match=r">= 0"):
        feature_choice(pre, T([1, -1, 1, 1]))
    with pytest.raises(TypeError, match="integer"):
        feature_choice(pre, T([1.0, 1.0, 1.0, 1.0]))


@pytest.mark.parametrize("shape", [(4,), (2, 3, 4)])
def test_wrong_ndim_rejected(shape):
    with pytest.raises(ValueError, match="2-D"):
        topk(torch.randn(shape), 1)


def test_integer_pre_rejected():
    with pytest.raises(TypeError, match="floating"):
        relu(torch.ones(2, 3, dtype=torch.long))


def test_gradient_topk_checks_latent_grad_and_beta():
    pre = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"latent_grad must have pre's shape \(3, 4\), got \(4, 3\)"):
        gradient_topk(pre, torch.randn(4, 3), 1, 1.0)
    with pytest.raises(ValueError, match="latent_grad contains NaN"):
        gradient_topk(pre, torch.full((3, 4), float("nan")), 1, 1.0)
    with pytest.raises(ValueError, match="beta=-0.5"):
        gradient_topk(pre, pre, 1, -0.5)


def test_threshold_shape_checked():
    with pytest.raises(ValueError, match="threshold must be a scalar or have shape"):
        jumprelu(torch.randn(3, 4), torch.zeros(3))


# ----------------------------------------------------------------------------- inference threshold


def test_threshold_ema_first_update_and_decay():
    ema = ThresholdEMA(decay=0.5)
    ema.update(T([[0.0, 2.0], [3.0, 0.0]]))
    assert float(ema.threshold) == 2.0  # first batch sets it, no pull towards the init
    ema.update(T([[1.0, 0.0]]))
    assert float(ema.threshold) == 1.5
    ema.update(torch.zeros(2, 2))  # nothing fired: unchanged
    assert float(ema.threshold) == 1.5


def test_threshold_ema_per_latent_only_fired_latents_update():
    ema = ThresholdEMA(n_latents=3, decay=0.5, per_latent=True)
    ema.update(T([[1.0, 0.0, 0.0], [4.0, 2.0, 0.0]]))
    ema.update(T([[3.0, 0.0, 0.0]]))
    assert ema.threshold.tolist() == [2.0, 2.0, float("inf")]  # latent 2 never fired: stays silent
    assert torch.equal(ema(T([[2.5, 2.5, 9.0]])), T([[2.5, 2.5, 0.0]]))
    assert "threshold" in ema.state_dict()


def test_threshold_ema_reproduces_mutual_choice_l0():
    gen = torch.Generator().manual_seed(0)
    k, ema = 8, ThresholdEMA()
    for _ in range(50):
        ema.update(mutual_choice(torch.randn(128, 256, generator=gen), k))
    test = torch.randn(128, 256, generator=gen)
    l0 = float(nnz_rows(ema(test)).float().mean())
    assert l0 == pytest.approx(k, rel=0.2)


def test_threshold_ema_per_latent_reproduces_feature_choice_l0():
    gen = torch.Generator().manual_seed(0)
    n_tokens, n_latents, m = 128, 256, 4
    ema = ThresholdEMA(n_latents, per_latent=True)
    for _ in range(50):
        ema.update(feature_choice(torch.randn(n_tokens, n_latents, generator=gen), m))
    l0 = float(nnz_rows(ema(torch.randn(n_tokens, n_latents, generator=gen))).float().mean())
    assert l0 == pytest.approx(m * n_latents / n_tokens, rel=0.2)
