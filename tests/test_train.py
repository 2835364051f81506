"""Losses and the training loop on small synthetic data with a known sparse structure:
x = 4 of 64 random unit atoms in d=32 (magnitudes in [0.5, 1.5]) + an offset."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import sae_repro.train as train_mod
from sae_repro.losses import aux_k_loss, aux_zipf_loss, mse, zipf_target_density
from sae_repro.metrics import fvu
from sae_repro.sae import SparseAutoencoder
from sae_repro.train import TrainConfig, evaluate, lr_factor, train_sae, train_step

D, ATOMS, K = 32, 64, 4



def synthetic(n: int = 4096, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(ATOMS, D, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    idx = torch.rand(n, ATOMS, generator=g).argsort(1)[:, :K]
    codes = torch.zeros(n, ATOMS).scatter_(1, idx, torch.rand(n, K, generator=g) + 0.5)
    return codes @ atoms + 0.5


X = synthetic()
HELDOUT = synthetic(5120)[4096:]  # the same atoms, other samples


def cfg(**kw) -> TrainConfig:
    base = dict(k=K, n_latents=ATOMS, batch_size=256, epochs=12, lr=2e-2, dead_window_tokens=4096, log_every=16)
    return TrainConfig(**{**base, **kw})


def weights(sae: SparseAutoencoder) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in sae.state_dict().items()}


# ----------------------------------------------------------------------------- losses


def test_mse_normalised_is_the_batch_fvu():
    x, x_hat = torch.randn(50, 8), torch.randn(50, 8)
    assert float(mse(x, x_hat)) == pytest.approx(fvu(x, x_hat), rel=1e-5)
    assert float(mse(x, x_hat, normalize=False)) == pytest.approx(float((x - x_hat).pow(2).sum(1).mean()), rel=1e-6)


def _aux_case(n_dead: int = 3):
    """16 tokens, 10 latents (unit rows), the error e = x - x_hat, dead latents 7..9."""
    g = torch.Generator().manual_seed(0)
    W_dec = torch.randn(10, 6, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    x, x_hat = torch.randn(16, 6, generator=g), torch.randn(16, 6, generator=g)
    dead = torch.zeros(10, dtype=torch.bool)
    dead[10 - n_dead:] = True
    return x, x_hat, W_dec, dead


def test_aux_k_zero_without_dead_latents():
    x, x_hat, W_dec, _ = _aux_case()
    pre = torch.randn(16, 10)
    assert float(aux_k_loss(x, x_hat, pre, torch.zeros(10, dtype=torch.bool), W_dec)) == 0.0


def test_aux_k_hand_computed_and_scaled():
    x, x_hat, W_dec, dead = _aux_case()
    pre = torch.randn(16, 10, generator=torch.Generator().manual_seed(1))
    k_aux = 2
    e = x - x_hat
    masked = torch.where(dead, pre, -math.inf)
    v, i = masked.topk(k_aux, dim=1)
    codes = torch.zeros(16, 10).scatter_(1, i, v.relu())
    want = min(3 / k_aux, 1.0) * (e - codes @ W_dec).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    assert_close(aux_k_loss(x, x_hat, pre, dead, W_dec, k_aux), want)
    # default k_aux = d // 2 = 3 = n_dead: scale 1, all three dead latents used
    assert float(aux_k_loss(x, x_hat, pre, dead, W_dec)) > 0


def test_aux_k_decreases_when_dead_latents_point_along_the_error():
    x, x_hat, W_dec, dead = _aux_case(n_dead=1)
    e = x - x_hat
    pre = torch.zeros(16, 10)
    pre[:, 9] = 1.0  # the dead latent fires 1 on every token
    far = aux_k_loss(x, x_hat, pre, dead, W_dec, 1)
    W_fit = W_dec.clone()
    W_fit[9] = e.mean(0)  # the best constant reconstruction of e with codes 1
    near = aux_k_loss(x, x_hat, pre, dead, W_fit, 1)
    assert near < far
    assert_close(near, torch.tensor(1.0))  # explains exactly the mean: the variance is left


def test_aux_k_gradient_only_reaches_dead_latents():
    x, x_hat, W_dec, dead = _aux_case()
    pre = torch.randn(16, 10).abs().requires_grad_(True)
    W = W_dec.clone().requires_grad_(True)
    aux_k_loss(x, x_hat, pre, dead, W).backward()
    assert (pre.grad[:, ~dead] == 0).all() and (pre.grad[:, dead] != 0).any()
    assert (W.grad[~dead] == 0).all()


def test_aux_zipf_generalises_aux_k():
    x, x_hat, W_dec, dead = _aux_case()
    pre = torch.randn(16, 10, generator=torch.Generator().manual_seed(2))
    density = torch.linspace(0.5, 0.0, 10)
    # fraction 0: only the dead latents, weight 1: exactly AuxK
    assert_close(aux_zipf_loss(x, x_hat, pre, density, W_dec, 2, underused_fraction=0.0, dead_mask=dead),
                 aux_k_loss(x, x_hat, pre, dead, W_dec, 2))
    # every latent at its target: nothing underused
    on_target = aux_zipf_loss(x, x_hat, pre, density, W_dec, 2, target=density)
    assert float(on_target) == 0.0
    # a latent far below target joins the pool
    target = density.clone()
    target[0] = 5.0
    assert float(aux_zipf_loss(x, x_hat, pre, density, W_dec, 2, target=target)) > 0


@pytest.mark.parametrize("which", ["auxk", "zipf"])
def test_aux_losses_sparse_pairs_equal_the_dense_block(which):
    """The training path (top k_aux chosen on the detached pre, only those pairs trained through
    the sparse kernels) gives the dense path's loss and gradients on every parameter."""
    sae_cfg = cfg(n_latents=48).sae_config(D)
    a, b = SparseAutoencoder(sae_cfg, seed=0), SparseAutoencoder(sae_cfg, seed=0)
    a.init_b_dec(X)
    b.load_state_dict(a.state_dict())
    x = X[:200]
    dead = torch.zeros(48, dtype=torch.bool)
    dead[::2] = True
    density = torch.linspace(0.3, 0.0, 48)
    losses = []
    for sae, sparse in ((a, True), (b, False)):
        out = sae.forward_sparse(x) if sparse else sae.forward_dense(x)
        x_hat = out.x_hat.detach()  # the aux losses alone
        if which == "auxk":
            loss = aux_k_loss(x, x_hat, out.pre, dead, sae.W_dec, 5, pre_pairs=out.pre_pairs)
        else:
            loss = aux_zipf_loss(x, x_hat, out.pre, density, sae.W_dec, 5, dead_mask=dead, pre_pairs=out.pre_pairs)
        loss.backward()
        losses.append(loss.detach())
    assert float(losses[0]) > 0
    assert_close(losses[0], losses[1])
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert getattr(b, name).grad.abs().sum() > 0, name
        assert_close(getattr(a, name).grad, getattr(b, name).grad, atol=1e-6, rtol=1e-4, msg=name)


def test_zipf_target_density_recovers_a_zipf_curve():
    ranks = torch.arange(1, 101, dtype=torch.float64)
    zipf = 0.3 * ranks.pow(-1.2)
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    assert_close(zipf_target_density(zipf[perm]), zipf[perm], rtol=1e-6, atol=1e-12)
    assert (zipf_target_density(torch.zeros(10)) == 0).all()


def test_loss_input_errors():
    x, x_hat, W_dec, dead = _aux_case()
    with pytest.raises(ValueError, match="x_hat"):
        mse(x, x_hat[:, :3])
    with pytest.raises(ValueError, match="pre"):
        aux_k_loss(x, x_hat, torch.zeros(16, 9), dead, W_dec)
    with pytest.raises(ValueError, match="dead_mask"):
        aux_k_loss(x, x_hat, torch.zeros(16, 10), dead.long(), W_dec)
    with pytest.raises(ValueError, match="k_aux"):
        aux_k_loss(x, x_hat, torch.zeros(16, 10), dead, W_dec, 0)
    with pytest.raises(ValueError, match="underused_fraction"):
        aux_zipf_loss(x, x_hat, torch.zeros(16, 10), torch.zeros(10), W_dec, underused_fraction=-1.0)


# ----------------------------------------------------------------------------- schedule, config


def test_lr_schedule_warmup_then_decay_to_zero():
    f = [lr_factor(s, 100, 10, 0.2) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[50] == 1.0 and f[79] == 1.0
    assert f[80] == 1.0 and f[90] == pytest.approx(0.5) and f[99] == pytest.approx(0.05)
    assert TrainConfig().resolved_lr(2**14) == pytest.approx(2e-4)
    assert TrainConfig().resolved_lr(4608) == pytest.approx(2e-4 / math.sqrt(4608 / 2**14))


@pytest.mark.parametrize("kw,match", [
    ({"rule": "relu"}, "rule='relu'"), ({"aux": "l1"}, "aux='l1'"), ({"batch_size": 0}, "batch_size"),
    ({"lr": -1.0}, "lr"), ({"decay_fraction": 1.5}, "decay_fraction"), ({"b_dec_init": "rand"}, "b_dec_init"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_bad_data():
    bad = X.clone()
    bad[5, 5] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        train_sae(bad, cfg(), progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        train_sae(X[:100], cfg(), progress=False)
    with pytest.raises(ValueError, match="needs grads"):
        train_sae(X, cfg(rule="gradient_topk", beta=1.0), progress=False)
    with pytest.raises(ValueError, match="grads must have"):
        train_sae(X, cfg(rule="gradient_topk", beta=1.0), grads=X[:, :5], progress=False)


class FakeStore:
    """Duck-typed ActivationStore: `spec.hooks`, `manifest["tensors"]`, `load(name)`."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.spec = type("Spec", (), {"hooks": tuple(k for k in tensors if "/" not in k)})()
        self.manifest = {"tensors": list(tensors)}

    def load(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def test_train_from_an_activation_store():
    grads = torch.randn(X.shape, generator=torch.Generator().manual_seed(2))
    c = cfg(epochs=1, rule="gradient_topk", beta=0.5)
    from_store, _ = train_sae(FakeStore({"h": X, "grad/h": grads}), c, progress=False)
    direct, _ = train_sae(X, c, grads=grads, progress=False)
    assert torch.equal(from_store.W_dec, direct.W_dec) and from_store.cfg.hook_name == "h"
    with pytest.raises(ValueError, match="needs gradients"):
        train_sae(FakeStore({"h": X}), c, progress=False)
    with pytest.raises(ValueError, match="name one"):
        train_sae(FakeStore({"a": X, "b": X}), cfg(), progress=False)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("rule", ["topk", "mutual_choice", "feature_choice", "gradient_topk"])
def test_training_recovers_sparse_structure(rule):
    # measured (seed 0): topk 0.073, mutual 0.092, feature 0.105, g-SAE with random gradients 0.106;
    # what is left is the crosstalk of 64 atoms in 32 dims through a linear encoder
    grads = torch.randn(X.shape, generator=torch.Generator().manual_seed(1)) if rule == "gradient_topk" else None
    c = cfg(rule=rule, beta=1.0 if rule == "gradient_topk" else 0.0)
    sae, history = train_sae(X, c, grads=grads, progress=False)
    ev = evaluate(sae, X, grads)
    fresh = SparseAutoencoder(c.sae_config(D), seed=c.seed)
    fresh.init_b_dec(X)
    assert evaluate(fresh, X, grads)["fvu"] > 0.3 and ev["fvu"] < 0.12  # fresh: 0.34 (topk) .. 0.7
    assert history[0]["fvu"] > history[-1]["fvu"]
    assert ev["dead_fraction"] == 0.0 and 3.0 <= ev["l0"] <= K
    assert history[-1]["step"] == 12 * 16 and history[-1]["tokens"] == 12 * 16 * 256
    assert set(history[-1]) >= {"step", "tokens", "lr", "fvu", "mse", "l0", "dead_fraction", "aux"}
    assert_close(sae.W_dec.norm(dim=1), torch.ones(ATOMS))  # unit rows after the last step


def test_training_is_deterministic_and_seeded():
    c = cfg(epochs=2, rule="mutual_choice")
    a, ha = train_sae(X, c, progress=False)
    b, hb = train_sae(X, c, progress=False)
    for name, t in weights(a).items():
        assert torch.equal(t, weights(b)[name]), name
    assert [r["fvu"] for r in ha] == [r["fvu"] for r in hb]
    other, _ = train_sae(X, cfg(epochs=2, rule="mutual_choice", seed=1), progress=False)
    assert not torch.equal(other.W_dec, a.W_dec)


def test_checkpoint_resume_matches_uninterrupted_run(tmp_path, monkeypatch):
    c = cfg(epochs=2, checkpoint_every=5, log_every=4, aux="zipf", dead_window_tokens=512)
    full, h_full = train_sae(X, c, progress=False)

    real_step, calls = train_mod.train_step, {"n": 0}

    def dies_at_step_13(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 13:
            raise KeyboardInterrupt("killed")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", dies_at_step_13)
    with pytest.raises(KeyboardInterrupt):
        train_sae(X, c, checkpoint_dir=tmp_path, progress=False)
    monkeypatch.setattr(train_mod, "train_step", real_step)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 10
    resumed, h_res = train_sae(X, c, checkpoint_dir=tmp_path, progress=False)
    for name, t in weights(full).items():
        assert torch.equal(t, weights(resumed)[name]), name
    assert [r["fvu"] for r in h_res] == [r["fvu"] for r in h_full]
    with pytest.raises(ValueError, match="another config"):
        train_sae(X, cfg(epochs=2, checkpoint_every=5, seed=3), checkpoint_dir=tmp_path, progress=False)


def test_aux_k_revives_dead_latents():
    """Latents 32..63 start as faint copies of 0..31: they never win the TopK, so without an
    auxiliary loss they stay dead and half the atoms go unexplained."""
    init = SparseAutoencoder(cfg().sae_config(D), seed=0)
    init.init_b_dec(X)
    with torch.no_grad():
        init.W_enc[:, 32:] = 0.1 * init.W_enc[:, :32]
    c = dict(epochs=12, dead_window_tokens=1024)
    plain, _ = train_sae(X, cfg(aux=None, **c), init=init, progress=False)
    aux, hist = train_sae(X, cfg(aux="auxk", log_every=1, **c), init=init, progress=False)
    ev_plain, ev_aux = evaluate(plain, X), evaluate(aux, X)
    assert ev_plain["dead_fraction"] > 0.4 and ev_aux["dead_fraction"] < 0.05
    assert ev_aux["fvu"] < 0.5 * ev_plain["fvu"]
    assert max(r["aux"] for r in hist) > 0


STEP_RULES = [dict(rule="topk"), dict(rule="gradient_topk", beta=2.0), dict(rule="mutual_choice"),
              dict(rule="feature_choice"), dict(rule="feature_choice", capacity="zipf")]


@pytest.mark.parametrize("kw", STEP_RULES, ids=lambda kw: "-".join(map(str, kw.values())))
def test_optimised_steps_train_the_same_sae_as_dense_autograd(kw):
    """The sparse step (pair kernels, reused pre buffer, latent-major Feature Choice matmul, our
    Adam) against plain dense autograd with torch's Adam: 6 steps with AuxK on, same weights."""
    from sae_repro.optim import Adam

    c_sparse, c_dense = cfg(**kw), cfg(sparse=False, **kw)
    a = SparseAutoencoder(c_sparse.sae_config(D), seed=0)
    a.init_b_dec(X)
    b = SparseAutoencoder(c_dense.sae_config(D), seed=0)
    b.load_state_dict(a.state_dict())
    dead = torch.zeros(ATOMS, dtype=torch.bool)
    dead[::3] = True  # exercise AuxK on both paths
    grads = torch.randn(X.shape, generator=torch.Generator().manual_seed(1)) if kw["rule"] == "gradient_topk" else None
    runs = ((a, c_sparse, Adam(a.parameters(), lr=1e-3)), (b, c_dense, torch.optim.Adam(b.parameters(), lr=1e-3)))
    for sae, c, opt in runs:
        for i in range(6):
            rows = slice(256 * i, 256 * (i + 1))
            out = train_step(sae, opt, X[rows], c, dead_mask=dead, grad=None if grads is None else grads[rows])
            assert float(out["aux"]) > 0
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-4, msg=name)
    if kw["rule"] in ("mutual_choice", "feature_choice"):
        assert_close(a.ema.threshold, b.ema.threshold, atol=1e-5, rtol=1e-4)


def test_our_adam_is_torch_adam_bit_for_bit_on_a_transposed_parameter():
    from sae_repro.optim import Adam

    w0 = torch.randn(48, 16).t().clone()  # [16, 48] stored latent-major, like W_enc
    assert not w0.is_contiguous()
    ps = [torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())]
    opts = [Adam([ps[0]], lr=1e-2), torch.optim.Adam([ps[1]], lr=1e-2, fused=True)]
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        grad = torch.randn(48, 16, generator=g).t()  # the gradient in the parameter's layout
        for p, opt in zip(ps, opts):
            p.grad = grad.clone()
            opt.step()
    assert torch.equal(ps[0], ps[1])
    assert ps[0].stride() == w0.stride()
    assert torch.equal(opts[0].state[ps[0]]["exp_avg_sq"], opts[1].state[ps[1]]["exp_avg_sq"])


def test_reused_pre_buffer_is_recomputed_each_call():
    sae = SparseAutoencoder(cfg().sae_config(D), seed=0)
    first = sae.forward_sparse(X[:256], reuse=True).pre.clone()
    second = sae.forward_sparse(X[256:512], reuse=True).pre
    assert_close(first, sae.pre_acts(X[:256]))
    assert_close(second, sae.pre_acts(X[256:512]))


def test_ddp_single_rank_is_bit_identical(tmp_path):
    import torch.distributed as dist

    c = cfg(epochs=1, rule="mutual_choice")
    plain, _ = train_sae(X, c, progress=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        wrapped, _ = train_sae(X, c, checkpoint_dir=tmp_path / "ck", progress=False)
    finally:
        dist.destroy_process_group()
    for name, t in weights(plain).items():
        assert torch.equal(t, weights(wrapped)[name]), name


def test_bf16_training_works():
    sae, _ = train_sae(X, cfg(bf16=True, epochs=8), progress=False)
    assert evaluate(sae, X)["fvu"] < 0.12


def test_evaluate_matches_metrics():
    sae, _ = train_sae(X, cfg(epochs=1), progress=False)
    ev = evaluate(sae, X[:1000], batch_size=300)
    with torch.no_grad():
        x_hat, codes = sae(X[:1000])
    assert ev["fvu"] == pytest.approx(fvu(X[:1000], x_hat), rel=1e-4)
    assert ev["l0"] == pytest.approx(float((codes != 0).sum(1).double().mean()))
    assert ev["dead_fraction"] == pytest.approx(float(((codes != 0).sum(0) == 0).double().mean()))
    assert ev["n_tokens"] == 1000 and ev["density"].shape == (ATOMS,)
    # per-context fire counts: contexts numbered by first appearance, summing to the density
    context = torch.arange(1000) // 7 + 100 * (torch.arange(1000) % 2 == 0)  # interleaved, unsorted
    ev = evaluate(sae, X[:1000], batch_size=300, context=context)
    f, t = ev["firings_per_context"], ev["tokens_per_context"]
    n_ctx = len(context.unique())
    assert f.shape == (n_ctx, ATOMS) and t.sum() == 1000
    np.testing.assert_allclose(f.sum(0) / 1000, ev["density"].numpy())
    c0 = context[0]  # context number 0 is the first token's
    assert t[0] == int((context == c0).sum())
    np.testing.assert_array_equal(f[0], ((codes[context == c0] != 0).sum(0)).double().numpy())
    with pytest.raises(ValueError, match="context has 999 tokens"):
        evaluate(sae, X[:1000], context=context[:999])


@pytest.mark.parametrize("rule", ["mutual_choice", "feature_choice"])
def test_batch_rules_come_out_of_train_sae_ready_for_inference(rule):
    """train_sae itself calibrates the threshold: eval-mode (threshold) inference keeps about the
    training budget of k latents per token (it kept ~2 of 8 when only the zoo calibrated)."""
    sae, _ = train_sae(X, cfg(rule=rule, epochs=2))
    l0 = float((sae.encode(X) != 0).sum(1).double().mean())
    assert not sae.training and 0.8 * K <= l0 <= 1.25 * K, l0


def test_a_non_finite_loss_stops_training_naming_the_step():
    with pytest.raises(FloatingPointError, match=r"training stopped at step 1: the loss is nan.*\|x\| = 2.1\de\+20"):
        train_sae(X * 1e20, cfg(epochs=1))


def test_the_encoder_starts_as_the_scaled_decoder_transpose():
    sae = train_mod._new_sae(X, cfg(), None, None)
    assert_close(sae.W_enc, sae.W_dec.t() * 3 ** -0.5)
    assert sae.W_dec.norm(dim=1).sub(1).abs().max() < 1e-6
    assert_close(train_mod._new_sae(X, cfg(encoder_init_norm=1.0), None, None).W_enc, sae.W_dec.t())
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="encoder_init_norm must be a finite number > 0"):
            cfg(encoder_init_norm=bad)


def test_heldout_rows_do_not_change_training_and_follow_the_fvu():
    c = cfg(epochs=4, log_every=4, heldout_points=5)  # 64 steps: held-out rows every 12 steps + the last
    plain, _ = train_sae(X, c, progress=False)
    watched, hist = train_sae(X, c, progress=False, heldout=HELDOUT)
    for name, t in weights(plain).items():
        assert torch.equal(t, weights(watched)[name]), name
    rows = [r for r in hist if not math.isnan(r["heldout_fvu"])]
    assert [r["step"] for r in rows] == [12, 24, 36, 48, 60, 64]
    assert rows[-1]["heldout_fvu"] < 0.75 * rows[0]["heldout_fvu"]  # 0.141 -> 0.095 here
    assert rows[-1]["heldout_fvu"] == pytest.approx(evaluate(watched, HELDOUT)["fvu"], rel=1e-5)
    with pytest.raises(ValueError, match=r"heldout must be \[n_tokens, d_in=32\]"):
        train_sae(X, c, progress=False, heldout=torch.zeros(10, 3))


def test_heldout_fvu_of_a_batch_rule_changes_nothing():
    sae, _ = train_sae(X, cfg(rule="mutual_choice", epochs=1), progress=False)
    before = (sae.cfg, sae.ema.threshold.clone(), sae.training)
    value = train_mod.heldout_fvu(sae, X[:1024], 256)
    assert (sae.cfg, sae.training) == (before[0], before[2]) and torch.equal(sae.ema.threshold, before[1])
    assert 0 < value < 1


def _curve(values, steps=(20, 40, 60, 80, 100)):
    return [{"step": s, "heldout_fvu": v} for s, v in zip(steps, values)]


def test_plateau_is_judged_over_the_last_fifth_of_the_steps():
    # at step 80 (80% of 100) -> step 100: (0.300 - 0.2971) / 0.3 = 0.97% < 1%: a plateau
    assert train_mod.plateau(_curve([0.5, 0.4, 0.35, 0.300, 0.2971])) == pytest.approx(
        {"steps": 100, "heldout_fvu": 0.2971, "gain": 0.00967, "plateaued": True}, abs=1e-4)
    still = train_mod.plateau(_curve([0.5, 0.4, 0.35, 0.300, 0.2969]))  # 1.03%: still falling
    assert still["plateaued"] is False and still["gain"] == pytest.approx(0.01033, abs=1e-4)
    rows = _curve([0.5, math.nan, 0.35, math.nan, 0.30])  # NaN rows (no held-out pass) are skipped
    assert train_mod.plateau(rows)["gain"] == pytest.approx((0.35 - 0.30) / 0.35)
    none = train_mod.plateau([{"step": 10, "fvu": 0.3}])
    assert none["plateaued"] is False and math.isnan(none["gain"]) and none["steps"] == 10


def test_training_summary_reads_the_history():
    s = train_mod.training_summary(_curve([0.5, 0.4, 0.35, 0.300, 0.2971]), n_tokens=12_800, batch_size=256)
    assert (s["train_steps"], s["train_tokens_seen"], s["train_distinct_tokens"]) == (100, 25_600, 12_800)
    assert s["train_epochs"] == 2.0 and s["plateaued"] is True
    assert (s["heldout_fvu"], s["heldout_tail_gain"]) == pytest.approx((0.2971, 0.00967), abs=1e-4)


# ----------------------------------------------------------------------------- the budget ladder


@pytest.mark.parametrize("rule", ["topk", "mutual_choice"])
def test_a_rung_is_the_sae_a_shorter_run_ends_with(rule):
    """Each rung (warmup-stable-decay branch) equals an independent run of its steps with the
    same warmup, bit for bit; the main run is the same with and without the ladder."""
    c = cfg(rule=rule, epochs=4, warmup_steps=3, aux="auxk", ladder=(0.25, 0.5))  # 64 steps
    rungs = []
    main, hist = train_sae(X, c, progress=False, heldout=HELDOUT, on_rung=lambda s, r: rungs.append((s, r)))
    plain, _ = train_sae(X, cfg(rule=rule, epochs=4, warmup_steps=3, aux="auxk"), progress=False)
    for name, t in weights(plain).items():
        assert torch.equal(t, weights(main)[name]), name
    assert [r["step"] for _, r in rungs] == [16, 32] and [r["rung_share"] for _, r in rungs] == [0.25, 0.5]
    for rung, row in rungs:
        alone, h = train_sae(X, cfg(rule=rule, max_steps=row["step"], warmup_steps=3, aux="auxk"),
                             progress=False, heldout=HELDOUT)
        for name, t in weights(alone).items():
            assert torch.equal(t, weights(rung)[name]), (row["step"], name)
        assert row["heldout_fvu"] == h[-1]["heldout_fvu"] and not rung.training
    assert rungs[0][1]["heldout_fvu"] > rungs[1][1]["heldout_fvu"] > hist[-1]["heldout_fvu"]


def test_a_resumed_run_keeps_the_rungs_it_had_and_makes_the_rest(tmp_path, monkeypatch):
    c = cfg(epochs=4, checkpoint_every=5, ladder=(0.25, 0.5))  # rungs branch at steps 12 and 25
    first, real_step, calls = [], train_mod.train_step, {"n": 0}

    def dies_at_step_24(*args, **kwargs):
        calls["n"] += 1  # 12 main steps + the first rung's 4 + 8 more main steps
        if calls["n"] == 25:
            raise KeyboardInterrupt("killed")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", dies_at_step_24)
    with pytest.raises(KeyboardInterrupt):
        train_sae(X, c, checkpoint_dir=tmp_path, progress=False, on_rung=lambda s, r: first.append(r["step"]))
    monkeypatch.setattr(train_mod, "train_step", real_step)
    assert first == [16]
    rest = []
    resumed, _ = train_sae(X, c, checkpoint_dir=tmp_path, progress=False, on_rung=lambda s, r: rest.append(r["step"]))
    assert rest == [32]
    full, _ = train_sae(X, c, progress=False, on_rung=lambda s, r: None)
    for name, t in weights(full).items():
        assert torch.equal(t, weights(resumed)[name]), name


@pytest.mark.parametrize("ladder", [(0.5, 0.25), (0.0, 0.5), (1.0,), (0.5, 0.5)])
def test_bad_ladder(ladder):
    with pytest.raises(ValueError, match="ladder must be increasing shares"):
        TrainConfig(ladder=ladder)


def test_a_ladder_needs_somewhere_to_put_its_rungs():
    with pytest.raises(ValueError, match="needs on_rung="):
        train_sae(X, cfg(epochs=1, ladder=(0.5,)), progress=False)
