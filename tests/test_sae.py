"""The autoencoder: shapes, the sparse path against the dense reference, training helpers,
save/load and the SAELens conversion in both directions. Small random data, known answers."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from sae_repro import saelens
from sae_repro.kernels import SparseCodes, flat_topk_indices
from sae_repro.metrics import l0
from sae_repro.sae import SAEConfig, SparseAutoencoder
from sae_repro.saelens import SAELENS_ARCHITECTURE
from sae_repro.sparsity import gradient_topk, topk
from sae_repro.train import calibrate_threshold, remove_parallel_decoder_grad, set_decoder_norm_to_unit

D, L, N = 16, 64, 200
RULES = [  # (rule, extra config)
    ("topk", {}),
    ("gradient_topk", {"beta": 2.0}),
    ("mutual_choice", {}),
    ("feature_choice", {}),
    ("feature_choice", {"capacity": "zipf"}),
    ("jumprelu", {"threshold": 0.3}),
    ("relu", {}),
]
IDS = [r + ("-" + "-".join(kw) if kw else "") for r, kw in RULES]



def data(n: int = N, d: int = D, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 2 + 1


def make(rule: str = "topk", seed: int = 1, **kw) -> SparseAutoencoder:
    sae = SparseAutoencoder(SAEConfig(d_in=D, n_latents=L, rule=rule, k=4, **kw), seed=seed)
    sae.init_b_dec(data())
    with torch.no_grad():  # non-trivial biases, so a dropped bias term would show
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
    return sae


# ----------------------------------------------------------------------------- shapes, init


def test_shapes_and_topk_budget():
    sae = make()
    x = data()
    pre = sae.pre_acts(x)
    codes = sae.encode(x)
    x_hat, codes2 = sae(x)
    assert pre.shape == codes.shape == (N, L) and x_hat.shape == (N, D)
    assert torch.equal(codes, codes2)
    assert ((codes != 0).sum(1) <= 4).all() and (codes >= 0).all()
    assert_close(pre, (x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    assert_close(x_hat, codes @ sae.W_dec + sae.b_dec, atol=1e-5, rtol=1e-5)


def test_init_is_tied_unit_and_seeded():
    a, b = (SparseAutoencoder(SAEConfig(d_in=D, n_latents=L), seed=3) for _ in range(2))
    assert_close(a.W_dec.norm(dim=1), torch.ones(L))
    assert torch.equal(a.W_enc, a.W_dec.t()) and (a.b_enc == 0).all() and (a.b_dec == 0).all()
    assert torch.equal(a.W_dec, b.W_dec)
    assert not torch.equal(a.W_dec, SparseAutoencoder(SAEConfig(d_in=D, n_latents=L), seed=4).W_dec)


def test_init_b_dec_geometric_median_resists_outliers():
    x = torch.randn(500, D) * 0.1
    x[:20] += 1000.0  # 4% far outliers
    sae = SparseAutoencoder(SAEConfig(d_in=D, n_latents=L))
    sae.init_b_dec(x, "mean")
    assert_close(sae.b_dec, x.mean(0))
    sae.init_b_dec(x)  # geometric median: stays with the bulk
    assert sae.b_dec.norm() < 1.0 < x.mean(0).norm()


# ----------------------------------------------------------------------------- sparse == dense


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("rule,kw", RULES, ids=IDS)
def test_sparse_path_matches_dense_reference(rule, kw, training):
    a, b = make(rule, **kw), make(rule, **kw)
    x, g = data(), data(seed=5)
    if rule in ("mutual_choice", "feature_choice") and not training:
        a.train()
        a.encode(x)  # learn a threshold first
        b.load_state_dict(a.state_dict())
    a.train(training), b.train(training)
    grad = g if rule == "gradient_topk" else None
    x_hat, codes = a(x, grad)
    out = b(x, grad, path="sparse")
    assert torch.equal(out.codes.to_dense().detach(), codes.detach())
    assert_close(out.x_hat, x_hat, atol=1e-5, rtol=1e-5)
    x_hat.pow(2).sum().backward()
    out.x_hat.pow(2).sum().backward()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        ga, gb = getattr(a, name).grad, getattr(b, name).grad
        assert_close(gb, ga, atol=1e-5 * ga.abs().max().item(), rtol=1e-4, msg=name)
    if rule in ("mutual_choice", "feature_choice"):
        assert torch.equal(a.ema.threshold, b.ema.threshold)


def test_sparse_gradient_reaches_x_when_asked():
    a, b = make(), make()
    x1 = data().requires_grad_(True)
    x2 = data().requires_grad_(True)
    a(x1)[0].pow(2).sum().backward()
    b(x2, path="sparse").x_hat.pow(2).sum().backward()
    assert_close(x2.grad, x1.grad, atol=1e-4, rtol=1e-4)


def test_decode_paths_agree():
    sae = make()
    codes = topk(sae.pre_acts(data()), 1).detach()  # density 1/64: converted to pairs
    ref = codes @ sae.W_dec + sae.b_dec
    assert_close(sae.decode(codes), ref, atol=1e-5, rtol=1e-5)
    assert_close(sae.decode(SparseCodes.from_dense(codes)), ref, atol=1e-5, rtol=1e-5)
    assert_close(sae.decode_dense(codes), ref)
    dense = torch.rand(5, L)  # dense codes take the matmul
    assert_close(sae.decode(dense), dense @ sae.W_dec + sae.b_dec)


def test_bf16_encoder_selects_nearly_the_same():
    sae = make()
    x = data()
    ref = sae(x, path="sparse").codes.to_dense()
    fast = sae(x, path="sparse", bf16=True).codes.to_dense()
    assert ((ref != 0) == (fast != 0)).float().mean() > 0.98  # a few near-ties swap
    both = (ref != 0) & (fast != 0)
    assert_close(fast[both], ref[both], atol=0.02, rtol=0.01)  # bf16 rounding of the values


def testflat_topk_indices_is_the_topk_set():
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(1 << 19, generator=g)
    M = 4000
    got = flat_topk_indices(flat, M)
    assert torch.equal(got.sort().values, flat.topk(M).indices.sort().values)
    ties = torch.zeros(1 << 19)  # all equal: any M of them are a top-M
    assert flat_topk_indices(ties, M).unique().numel() == M


# ----------------------------------------------------------------------------- rules


def test_gradient_topk_selection_and_fallback():
    sae = make("gradient_topk", beta=3.0)
    x, g = data(), data(seed=7)
    pre = sae.pre_acts(x)
    want = gradient_topk(pre, g @ sae.W_dec.t(), 4, 3.0)
    assert torch.equal(sae.encode(x, latent_grad_from=g), want)
    assert torch.equal(sae.encode(x), topk(pre, 4))  # no gradient: plain TopK
    with pytest.raises(ValueError, match="latent_grad_from"):
        sae.encode(x, latent_grad_from=g[:10])


def test_batch_rules_learn_threshold_in_training_only():
    sae = make("mutual_choice")
    x = data()
    sae.eval()
    assert (sae.encode(x) == 0).all()  # nothing learned yet: threshold inf
    sae.train()
    codes = sae.encode(x)
    thr = sae.ema.threshold.clone()
    assert thr == codes[codes > 0].min()  # first update = the batch's smallest kept value
    sae.eval()
    sae.encode(x)
    assert torch.equal(sae.ema.threshold, thr)  # eval does not update
    assert torch.equal(sae.encode(x), torch.where(sae.pre_acts(x) > thr, sae.pre_acts(x).relu(), 0.0))
    sae.cfg.inference = "batch"
    assert torch.equal(sae.encode(x), codes)


def test_feature_choice_capacities():
    sae = make("feature_choice")
    assert sae.capacities(256) == 4 * 256 // L
    z = make("feature_choice", capacity="zipf").capacities(256)
    assert int(z.sum()) == 4 * 256 and (z[:-1] >= z[1:]).all()
    codes = sae.encode(data(256))
    assert ((codes != 0).sum(0) <= 16).all()


# ----------------------------------------------------------------------------- training helpers


def test_decoder_norm_and_parallel_gradient_removal():
    sae = make()
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(L, 1) + 0.5)
    sae(data())[0].pow(2).sum().backward()
    remove_parallel_decoder_grad(sae)
    cos = (sae.W_dec.grad * sae.W_dec).sum(1) / (sae.W_dec.grad.norm(dim=1) * sae.W_dec.norm(dim=1) + 1e-12)
    assert cos.abs().max() < 1e-5
    set_decoder_norm_to_unit(sae)
    assert_close(sae.W_dec.norm(dim=1), torch.ones(L))


# ----------------------------------------------------------------------------- bad input


def test_bad_input_errors():
    sae = make()
    with pytest.raises(ValueError, match=r"d_in=16.*\(200, 15\)"):
        sae.encode(torch.randn(N, D - 1))
    with pytest.raises(ValueError, match="shape"):
        sae.encode(torch.randn(D))
    x = data()
    x[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sae.encode(x)
    with pytest.raises(ValueError, match="NaN"):
        sae(x, path="sparse")
    with pytest.raises(ValueError, match="floating"):
        sae.encode(torch.ones(N, D, dtype=torch.long))
    with pytest.raises(ValueError, match="codes"):
        sae.decode(torch.zeros(3, L + 1))
    with pytest.raises(ValueError, match="path"):
        sae(data(), path="fast")


@pytest.mark.parametrize("kw,match", [
    ({"rule": "nope"}, "rule='nope'"),
    ({"k": 0}, "k must be"),
    ({"k": L + 1}, "k=65"),
    ({"inference": "mean"}, "inference"),
    ({"normalize_activations": "layer_norm"}, "normalize_activations"),
    ({"beta": -1.0}, "beta"),
    ({"capacity": "pareto"}, "capacity"),
])
def test_bad_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        SAEConfig(d_in=D, n_latents=L, **kw)


# ----------------------------------------------------------------------------- save / load


def trained_state(sae: SparseAutoencoder) -> SparseAutoencoder:
    if sae.cfg.rule in ("mutual_choice", "feature_choice"):
        sae.train()
        sae.encode(data(seed=9))
    return sae.eval()


@pytest.mark.parametrize("rule,kw", RULES, ids=IDS)
def test_save_load_roundtrip(tmp_path, rule, kw):
    sae = trained_state(make(rule, **kw, hook_name="blocks.3.hook_resid_post"))
    saelens.save(sae, tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == SAELENS_ARCHITECTURE[rule]
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    back = saelens.load(tmp_path / "sae")
    assert back.cfg == sae.cfg and not back.training
    for name, t in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    x = data(seed=3)
    assert torch.equal(back(x)[0], sae(x)[0])


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="cfg.json"):
        saelens.load(tmp_path)
    saelens.save(make(), tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    del cfg["metadata"]["sae_repro"]
    for key, value, match in [("architecture", "gated", "architecture='gated'"),
                              ("normalize_activations", "layer_norm", "normalize_activations")]:
        bad = {**cfg, key: value}
        (tmp_path / "s" / "cfg.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            saelens.load(tmp_path / "s")


# ----------------------------------------------------------------------------- SAELens


@pytest.fixture(scope="module")
def sae_lens():
    return pytest.importorskip("sae_lens")  # ~10 s to import: once for the module


@pytest.mark.parametrize("rule,kw", RULES, ids=IDS)
def test_ours_loads_in_sae_lens(sae_lens, tmp_path, rule, kw):
    sae = trained_state(make(rule, **kw))
    theirs = sae_lens.SAE.load_from_disk(saelens.save(sae, tmp_path / "sae"))
    assert theirs.cfg.architecture() == SAELENS_ARCHITECTURE[rule]
    x = data(seed=4)
    with torch.no_grad():
        assert_close(theirs.encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)
        assert_close(theirs(x), sae(x)[0], atol=1e-5, rtol=1e-5)
    assert theirs.cfg.metadata.sae_repro["rule"] == rule


def _random_sae_lens(sae_lens, arch: str, **flags):
    from sae_lens.saes import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

    cls, cfg_cls = {"topk": (TopKSAE, TopKSAEConfig), "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig),
                    "standard": (StandardSAE, StandardSAEConfig)}[arch]
    sae = cls(cfg_cls(d_in=D, d_sae=L, **flags))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in sae.parameters():  # random everything, non-unit decoder rows included
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(L, generator=g) * 0.5)
    return sae


@pytest.mark.parametrize("arch,flags", [
    ("topk", {"k": 5}),
    ("topk", {"k": 5, "rescale_acts_by_decoder_norm": True}),
    ("topk", {"k": 5, "apply_b_dec_to_input": False}),
    ("jumprelu", {}),
    ("jumprelu", {"apply_b_dec_to_input": False}),
    ("standard", {}),
], ids=["topk", "topk-rescale", "topk-no-bdec-in", "jumprelu", "jumprelu-no-bdec-in", "standard"])
def test_sae_lens_loads_in_ours(sae_lens, tmp_path, arch, flags):
    theirs = _random_sae_lens(sae_lens, arch, **flags)
    theirs.save_model(tmp_path / "theirs")
    ours = saelens.load(tmp_path / "theirs")
    from_obj = saelens.from_sae_lens(theirs)
    x = data(seed=6)
    with torch.no_grad():
        want_codes, want_x = theirs.encode(x), theirs(x)
        for sae in (ours, from_obj):
            assert_close(sae.encode(x), want_codes, atol=1e-5, rtol=1e-5)
            assert_close(sae(x)[0], want_x, atol=1e-5, rtol=1e-5)
            assert_close(sae(x, path="sparse").x_hat, want_x, atol=1e-5, rtol=1e-5)
    # and back again: ours saved -> SAELens gives the same output
    again = sae_lens.SAE.load_from_disk(saelens.save(ours, tmp_path / "again"))
    with torch.no_grad():
        assert_close(again(x), want_x, atol=1e-5, rtol=1e-5)


def test_to_sae_lens(sae_lens):
    sae = make()
    theirs = saelens.to_sae_lens(sae)
    x = data()
    with torch.no_grad():
        assert_close(theirs(x), sae(x)[0], atol=1e-5, rtol=1e-5)


def test_calibrated_threshold_keeps_the_training_budget():
    """After calibration, threshold inference keeps about k latents per token (Mutual Choice) and
    about m tokens per latent (Feature Choice) on the data it was calibrated on."""
    torch.manual_seed(0)
    x = torch.randn(2048, 16)
    for rule in ("mutual_choice", "feature_choice"):
        sae = SparseAutoencoder(SAEConfig(d_in=16, n_latents=64, rule=rule, k=4), seed=0)
        calibrate_threshold(sae, x, batch_size=256)
        sae.eval()
        codes = sae.encode(x)
        assert 0.8 * 4 <= l0(codes) <= 1.25 * 4, (rule, l0(codes))


def test_load_pretrained_reads_a_saelens_folder_and_names_bad_specs(tmp_path):
    from sae_repro.saelens import load_pretrained

    sae = SparseAutoencoder(SAEConfig(d_in=8, n_latents=16, rule="topk", k=3), seed=1)
    saelens.save(sae, tmp_path / "mine")
    again = load_pretrained(str(tmp_path / "mine"))
    x = torch.randn(5, 8)
    torch.testing.assert_close(again(x)[0], sae.eval()(x)[0])
    with pytest.raises(ValueError, match="release:sae_id"):
        load_pretrained("no-such-folder-or-release")
