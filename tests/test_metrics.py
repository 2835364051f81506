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
