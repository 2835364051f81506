"""JumpReLU training: the straight-through estimators against finite differences, training on a
synthetic sparse signal with known features, and a round trip through SAELens."""

import pytest
import torch

from sae_repro import saelens
from sae_repro.jumprelu import JumpReLU, JumpReLUConfig, Step, sparse_step, train_jumprelu
from sae_repro.sae import SAEConfig, SparseAutoencoder

EPS = 0.1


def _ramp(z: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """H(z - theta) smoothed by the rectangle kernel of width EPS: a linear ramp."""
    return ((z - theta) / EPS + 0.5).clamp(0.0, 1.0)


def _case():
    # pre-activations near and far from the thresholds (none on a ramp edge)
    z = torch.tensor([[0.52, 0.10, 1.30], [0.47, 0.33, 0.97], [0.90, 0.28, 1.04], [0.20, 0.31, 1.70]],
                     dtype=torch.float64)
    theta = torch.tensor([0.50, 0.30, 1.00], dtype=torch.float64)
    return z, theta


def _fd(f, theta: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    out = torch.zeros_like(theta)
    for i in range(len(theta)):
        up, down = theta.clone(), theta.clone()
        up[i] += h
        down[i] -= h
        out[i] = (f(up) - f(down)) / (2 * h)
    return out


def test_step_threshold_gradient_is_the_derivative_of_the_smoothed_l0():
    z, theta = _case()
    t = theta.clone().requires_grad_(True)
    Step.apply(z, t, EPS).sum().backward()
    want = _fd(lambda th: _ramp(z, th).sum(), theta)
    assert torch.allclose(t.grad, want, atol=1e-6)
    assert (t.grad != 0).all()  # every latent has a token inside its kernel here


def test_jumprelu_threshold_gradient_matches_the_smoothed_output_to_first_order():
    z, theta = _case()
    t = theta.clone().requires_grad_(True)
    zz = z.clone().requires_grad_(True)
    JumpReLU.apply(zz, t, EPS).sum().backward()
    # smoothed output z * ramp: its theta-derivative is -(z / eps) K, the estimator's -(theta / eps) K;
    # inside the kernel |z - theta| < eps / 2, so they differ by at most that share of theta
    want = _fd(lambda th: (z * _ramp(z, th)).sum(), theta)
    assert torch.allclose(t.grad, want, rtol=EPS / 2 / float(theta.min()), atol=1e-9)
    assert torch.equal(zz.grad, (z > theta).double())  # z's gradient passes where the latent is kept


@pytest.mark.parametrize("b_dec_in", [True, False])
def test_the_sparse_step_has_the_dense_estimators_gradients(b_dec_in):
    """sparse_step (active and band pairs only) against the dense JumpReLU / Step functions: the
    same x_hat, L0 and gradients of every parameter and of the thresholds (up to rounding), with
    non-zero biases, with and without b_dec subtracted from the input, and with a second step
    run before the first's backward (sparse_step reuses the pre-activation buffer)."""
    g = torch.Generator().manual_seed(0)
    cfg = SAEConfig(d_in=8, n_latents=24, rule="jumprelu", k=4, apply_b_dec_to_input=b_dec_in)
    sae = SparseAutoencoder(cfg, seed=0)
    with torch.no_grad():
        sae.b_enc.copy_(0.2 * torch.randn(24, generator=g))
        sae.b_dec.copy_(0.5 * torch.randn(8, generator=g))
    x, x_other = torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g)
    log_theta = torch.full((24,), -0.6).add_(0.3 * torch.randn(24, generator=g)).requires_grad_(True)
    eps, lam = 0.3, 0.05
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, log_theta]

    def objective(x_hat, l0):
        return (x - x_hat).pow(2).sum(1).mean() + lam * l0

    theta = log_theta.exp()
    x_hat_s, l0_s = sparse_step(sae, x, theta, eps)
    sparse_step(sae, x_other, theta, eps)  # overwrites the buffer the first step's pre lived in
    g_s = torch.autograd.grad(objective(x_hat_s, l0_s), params)
    theta = log_theta.exp()  # a fresh graph for the dense pass
    z = sae.pre_acts(x)
    x_hat_d = JumpReLU.apply(z, theta, eps) @ sae.W_dec + sae.b_dec
    l0_d = Step.apply(z, theta, eps).sum(1).mean()
    g_d = torch.autograd.grad(objective(x_hat_d, l0_d), params)
    assert torch.allclose(x_hat_s, x_hat_d, atol=1e-5) and float(l0_s.detach()) == pytest.approx(float(l0_d.detach()))
    for name, a, b in zip(["W_enc", "b_enc", "W_dec", "b_dec", "log_theta"], g_s, g_d):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name
        assert b.abs().max() > 0, name  # every gradient is exercised
    band = ((z - theta).abs() < eps / 2).detach()
    assert (band & (z > theta)).sum() > 20 and (band & (z <= theta)).sum() > 20  # both sides of theta
    assert (g_d[-1] != 0).sum() > 12  # most thresholds have band pairs in this case


def _sparse_signal(n=8192, d=32, n_features=96, active=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n_features, d, generator=g)
    feats /= feats.norm(dim=1, keepdim=True)
    idx = torch.stack([torch.randperm(n_features, generator=g)[:active] for _ in range(n)])
    mags = 1.0 + torch.rand(n, active, generator=g)
    codes = torch.zeros(n, n_features).scatter_(1, idx, mags)
    return codes @ feats, feats


def test_training_lowers_the_loss_moves_l0_to_its_target_and_finds_the_features():
    x, feats = _sparse_signal()  # 4 of 96 known features per token
    # the target (3) is below the signal's own sparsity, so the penalty binds; start far above it
    cfg = JumpReLUConfig(n_latents=96, target_l0=3.0, init_l0=12.0, batch_size=256, epochs=12, seed=0)
    sae, hist = train_jumprelu(x[:7168], cfg, heldout=x[7168:])
    early, late = hist.iloc[:3], hist.iloc[-5:]
    assert early.l0.mean() > 2 * 3.0 and abs(late.l0.mean() - 3.0) < 0.25 * 3.0
    assert late.fvu.mean() < 0.5 * early.fvu.mean()  # the reconstruction (the loss holds a rising lam)
    assert hist.heldout_fvu.dropna().iloc[-1] < 0.3
    with torch.no_grad():
        _, codes = sae(x[7168:])
        best = (feats @ sae.W_dec.T).max(1).values  # each true feature's closest decoder row
    assert abs(float((codes > 0).sum(1).float().mean()) - 3.0) < 0.3 * 3.0  # held out, raw units
    assert best.mean() > 0.9


def test_fixed_coefficient_sets_sparsity():
    x, _ = _sparse_signal(n=4096)
    l0s = []
    for coef in (1e-3, 3e-2):
        cfg = JumpReLUConfig(n_latents=96, target_l0=None, l0_coef=coef, batch_size=256, epochs=8, seed=0)
        sae, hist = train_jumprelu(x, cfg)
        l0s.append(hist.l0.iloc[-5:].mean())
        after_warmup = hist[hist.step > 0.1 * hist.step.max()]
        assert after_warmup.loss.iloc[-5:].mean() < after_warmup.loss.iloc[:3].mean()  # fixed lam: the loss falls
    assert l0s[1] < l0s[0]  # a larger penalty, fewer active latents


def test_saved_jumprelu_sae_loads_in_saelens_with_identical_outputs(tmp_path):
    import sae_lens

    x, _ = _sparse_signal(n=2048)
    sae, _ = train_jumprelu(x, JumpReLUConfig(n_latents=96, target_l0=6.0, batch_size=256, epochs=2))
    theirs = sae_lens.SAE.load_from_disk(saelens.save(sae, tmp_path / "jr"))
    ours_codes = sae.encode(x[:64])
    assert torch.equal(theirs.encode(x[:64]), ours_codes)
    assert torch.allclose(theirs.decode(ours_codes), sae.decode(ours_codes), atol=1e-6)
    back = saelens.load(tmp_path / "jr")
    assert torch.equal(back.threshold, sae.threshold)


def test_bad_config():
    with pytest.raises(ValueError, match="bandwidth"):
        JumpReLUConfig(bandwidth=0.0)
    with pytest.raises(ValueError, match="target_l0"):
        JumpReLUConfig(target_l0=-1.0)
    with pytest.raises(ValueError, match="batch_size=4096 is larger"):
        train_jumprelu(torch.randn(100, 8), JumpReLUConfig(batch_size=4096))
