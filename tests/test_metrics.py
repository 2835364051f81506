import math

import pytest
import torch

from sae_repro.metrics import dead_fraction, dense_fraction, feature_density, fvu, l0


def test_fvu_hand_computed():
    # x has mean (1, 1); total variance around the mean = 2 + 2 = 4 (not 8 = variance around 0).
    x = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
    x_hat = torch.tensor([[0.0, 1.0], [2.0, 2.0]])  # one unit of squared error
    assert fvu(x, x_hat) == pytest.approx(1 / 4)
    assert fvu(x, x) == 0.0
    assert fvu(x, x.mean(0).expand_as(x)) == pytest.approx(1.0)  # predicting the mean


def test_fvu_shape_error():
    with pytest.raises(ValueError, match="x_hat"):
        fvu(torch.zeros(3, 2), torch.zeros(3, 3))


@pytest.mark.parametrize("x, x_hat, match", [
    ([[0.0, float("nan")], [2.0, 2.0]], [[0.0, 0.0], [2.0, 2.0]], "x contains NaN"),
    ([[0.0, 0.0], [2.0, 2.0]], [[0.0, float("inf")], [2.0, 2.0]], "x_hat contains NaN or inf"),
    ([[1.0, 2.0], [1.0, 2.0]], [[1.0, 2.0], [1.0, 2.0]], "zero variance"),   # perfect, but undefined
    ([[1.0, 2.0], [1.0, 2.0]], [[0.0, 2.0], [1.0, 2.0]], "zero variance"),
])
def test_fvu_rejects_undefined_inputs(x, x_hat, match):
    with pytest.raises(ValueError, match=match):
        fvu(torch.tensor(x), torch.tensor(x_hat))
    with pytest.raises(ValueError, match="at least one token"):
        fvu(torch.zeros(0, 2), torch.zeros(0, 2))


def test_l0_density_dead_dense():
    codes = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 3.0]])
    assert l0(codes) == pytest.approx(1.5)
    assert feature_density(codes).tolist() == [0.5, 0.0, 1.0]
    assert dead_fraction(torch.tensor([3, 0, 0, 1])) == pytest.approx(0.5)
    assert dense_fraction(feature_density(codes), threshold=0.6) == pytest.approx(1 / 3)


def test_ce_recovered_and_kl_hand_computed():
    from sae_repro.metrics import ce_loss_recovered, kl_divergence

    # clean 2.0, zero-ablated 6.0, spliced 3.0: the SAE closes 3 of the 4 nats of the gap
    assert ce_loss_recovered(2.0, 3.0, 6.0) == pytest.approx(0.75)
    assert ce_loss_recovered(2.0, 2.0, 6.0) == pytest.approx(1.0)
    assert ce_loss_recovered(2.0, 6.0, 6.0) == pytest.approx(0.0)
    # KL((1/2, 1/2) || (1/4, 3/4)) = 1/2 ln 2 + 1/2 ln(2/3)
    p = torch.tensor([0.5, 0.5]).log()
    q = torch.tensor([0.25, 0.75]).log()
    assert float(kl_divergence(p, q)) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert float(kl_divergence(p, p)) == 0.0


def _identity_sae(rule: str, k: int = 1):
    """An SAE whose pre-activations are x itself (W_enc = I, zero biases), 4 latents."""
    from sae_repro.sae import SAEConfig, SparseAutoencoder

    sae = SparseAutoencoder(SAEConfig(d_in=4, n_latents=4, rule=rule, k=k))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


_X = torch.tensor([[5.0, 4.0, 0.0, 0.0],
                   [1.0, 0.0, 0.0, 0.0],
                   [3.0, 0.0, 0.0, 0.0],
                   [0.0, 0.0, 0.0, 0.5]])


def test_latents_per_token_batch_rules_hand_computed():
    from sae_repro.metrics import latents_per_token

    mc = _identity_sae("mutual_choice")
    # one batch of 4: the 4 largest entries (5, 4, 3, 1) -> tokens get 2, 1, 1, 0
    assert latents_per_token(mc, _X, inference="batch", batch_size=4).tolist() == [2, 1, 1, 0]
    # batches of 2: top-2 of rows 0-1 is (5, 4); of rows 2-3, (3, 0.5)
    assert latents_per_token(mc, _X, inference="batch", batch_size=2).tolist() == [2, 0, 1, 1]
    # a fifth token makes a partial batch, which is dropped
    x5 = torch.cat([_X, torch.ones(1, 4)])
    assert latents_per_token(mc, x5, inference="batch", batch_size=2).tolist() == [2, 0, 1, 1]
    mc.ema.threshold.fill_(2.5)  # threshold inference keeps 5, 4 and 3
    assert latents_per_token(mc, x5, batch_size=2).tolist() == [2, 0, 1, 0, 0]
    assert not mc.training  # left in eval mode, threshold untouched
    assert float(mc.ema.threshold) == 2.5

    fc = _identity_sae("feature_choice")
    # m = k * n / n_latents = 1: each latent takes its largest token; latent 2 is all zeros (reads 0)
    assert latents_per_token(fc, _X, inference="batch", batch_size=4).tolist() == [2, 0, 0, 1]
    fc.ema.threshold.copy_(torch.tensor([2.0, 1.0, 0.0, 0.1]))  # per-latent thresholds
    assert latents_per_token(fc, _X).tolist() == [2, 0, 1, 1]

    tk = _identity_sae("topk")  # token-wise: both modes agree
    assert latents_per_token(tk, _X, inference="batch", batch_size=2).tolist() == [1, 1, 1, 1]
    assert latents_per_token(tk, _X, batch_size=3).tolist() == [1, 1, 1, 1]


def test_latents_per_token_errors():
    from sae_repro.metrics import latents_per_token

    mc = _identity_sae("mutual_choice")
    with pytest.raises(ValueError, match="inference"):
        latents_per_token(mc, _X, inference="dense")
    with pytest.raises(ValueError, match="batch_size"):
        latents_per_token(mc, _X, inference="batch", batch_size=8)
    with pytest.raises(ValueError, match="batch_size"):
        latents_per_token(mc, _X, batch_size=0)
    with pytest.raises(ValueError, match="d_in=4"):
        latents_per_token(mc, torch.zeros(3, 5))


def test_interp_log_l0_known_line():
    import numpy as np

    from sae_repro.metrics import interp_log_l0

    ref_l0 = [64.0, 4.0, 16.0]  # any order
    line = lambda l0: 2.0 + 3.0 * np.log(l0)  # noqa: E731  linear in log L0: read back exactly
    ref_y = [line(v) for v in ref_l0]
    got = interp_log_l0(ref_l0, ref_y, [4.0, 8.0, 30.0, 64.0])
    np.testing.assert_allclose(got, line(np.array([4.0, 8.0, 30.0, 64.0])))
    # between two points of a curved reference: the chord in log L0 (midpoint of 4 and 16 is 8)
    assert interp_log_l0([4, 16], [0.0, 1.0], 8.0) == pytest.approx(0.5)
    # outside the range: NaN unless within max_ratio of an end, then along the end segment
    assert np.isnan(interp_log_l0(ref_l0, ref_y, [80.0, 3.0])).all()
    np.testing.assert_allclose(interp_log_l0(ref_l0, ref_y, [80.0, 3.0], max_ratio=1.5), line(np.array([80.0, 3.0])))
    assert np.isnan(interp_log_l0(ref_l0, ref_y, [200.0], max_ratio=1.5)).all()


def test_interp_log_l0_errors():
    from sae_repro.metrics import interp_log_l0

    with pytest.raises(ValueError, match="same length"):
        interp_log_l0([1.0, 2.0], [1.0], 1.5)
    with pytest.raises(ValueError, match="> 0"):
        interp_log_l0([1.0, 2.0], [1.0, 2.0], 0.0)
    with pytest.raises(ValueError, match="repeated"):
        interp_log_l0([2.0, 2.0], [1.0, 2.0], 2.0)
    with pytest.raises(ValueError, match="max_ratio"):
        interp_log_l0([1.0, 2.0], [1.0, 2.0], 1.5, max_ratio=0.5)


def test_other_metrics_reject_undefined_inputs():
    from sae_repro.metrics import ce_loss_recovered, dead_fraction, feature_density, l0

    for f in (l0, feature_density):
        with pytest.raises(ValueError, match="n_tokens >= 1"):
            f(torch.zeros(0, 4))
        with pytest.raises(ValueError, match="NaN"):
            f(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="empty"):
        dead_fraction(torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="finite"):
        ce_loss_recovered(2.0, float("nan"), 5.0)
    assert math.isnan(ce_loss_recovered(2.0, 2.5, 2.0))  # no gap to recover: undefined, said as NaN
