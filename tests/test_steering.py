import pytest
import torch

from sae_repro.models import load_model
from sae_repro.steering import (
    _add_hook,
    compare_steering,
    live_latents,
    paired_steering,
    per_direction,
    random_directions,
    steering_effect,
    steering_per_position,
    top_promoted_token,
)

LAST = "blocks.1.hook_resid_post"  # the tiny model's last residual stream, just before ln_final
FIRST = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-random")


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(0))


def test_random_directions_unit_and_seeded():
    a, b = random_directions(5, 64, seed=3), random_directions(5, 64, seed=3)
    assert a.shape == (5, 64) and torch.equal(a, b)
    assert torch.allclose(a.norm(dim=-1), torch.ones(5))
    assert not torch.equal(a, random_directions(5, 64, seed=4))


def test_scale_zero_changes_nothing(model, tokens):
    dirs = random_directions(3, model.cfg.d_model, seed=0)
    df = steering_effect(model, FIRST, dirs, tokens, scale=0.0, targets=torch.tensor([1, 2, 3]))
    assert (df["kl"].abs() < 1e-10).all() and (df["target_logprob_delta"].abs() < 1e-10).all()
    assert df["kl_per_norm"].isna().all()


def test_kl_grows_with_scale(model, tokens):
    dirs = random_directions(3, model.cfg.d_model, seed=1)
    kls = torch.tensor([steering_effect(model, FIRST, dirs, tokens, scale=s)["kl"].tolist()
                        for s in (0.5, 2.0, 8.0)])  # [n_scales, n_dirs]
    assert (kls[0] > 0).all() and (kls.diff(dim=0) > 0).all(), kls


def test_unembedding_direction_promotes_its_token(model, tokens):
    targets = torch.tensor([5, 65, 200])
    dirs = model.W_U.detach().T[targets] * 7.0  # any multiple: directions are normalised
    assert torch.equal(top_promoted_token(model, dirs), targets)
    df = steering_effect(model, LAST, dirs, tokens, scale=50.0, targets=targets)
    assert (df["target_logprob_delta"] > 1.0).all()
    assert df["target"].tolist() == targets.tolist()
    # the opposite direction demotes it
    neg = steering_effect(model, LAST, -dirs, tokens, scale=50.0, targets=targets)
    assert (neg["target_logprob_delta"] < 0).all()


def test_batching_does_not_change_results(model, tokens):
    dirs, ctx = random_directions(3, model.cfg.d_model, seed=2), tokens[:2]
    targets = top_promoted_token(model, dirs)
    ref = steering_per_position(model, FIRST, dirs, ctx, scale=3.0, targets=targets, batch_size=1)
    for bs in (4, 100):  # 2 contexts x 2 stacked directions then 1; everything in one pass
        out = steering_per_position(model, FIRST, dirs, ctx, scale=3.0, targets=targets, batch_size=bs)
        torch.testing.assert_close(out.kl, ref.kl, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(out.target_logprob_delta, ref.target_logprob_delta, atol=1e-5, rtol=1e-4)
    # a single direction ([d_model]) gives that direction's row
    one = steering_per_position(model, FIRST, dirs[1], ctx, scale=3.0)
    torch.testing.assert_close(one.kl[0], ref.kl[1], atol=1e-6, rtol=1e-4)


def test_last_position_only(model, tokens):
    dirs = random_directions(2, model.cfg.d_model, seed=5)
    res = steering_per_position(model, FIRST, dirs, tokens, scale=5.0, positions="last")
    assert res.kl.shape == (2, *tokens.shape) and res.target_logprob_delta is None
    assert res.kl[..., :-1].abs().max() < 1e-10  # causal: earlier positions never see the change
    assert (res.kl[..., -1] > 1e-4).all()
    df = steering_effect(model, FIRST, dirs, tokens, scale=5.0, positions="last")
    torch.testing.assert_close(torch.tensor(df["kl"].to_numpy()), res.kl[..., -1].mean(1))
    assert df["target"].isna().all() and df["target_logprob_delta"].isna().all()


def test_compare_steering_separates_groups(model, tokens):
    aligned = model.W_U.detach().T[torch.tensor([10, 20, 30, 40])]
    rand = random_directions(4, model.cfg.d_model, seed=0)
    out = compare_steering(model, LAST, aligned, rand, tokens, 20.0, names=("unembed", "random"))
    assert list(out.columns) == ["group", "metric", "n", "mean", "median", "sem"]
    assert len(out) == 6 and (out["n"] == 4).all()
    m = out.set_index(["group", "metric"])["mean"]
    assert m["unembed", "target_logprob_delta"] > m["random", "target_logprob_delta"] > 0
    no_t = compare_steering(model, LAST, aligned, rand, tokens, 20.0, targets=None)
    assert set(no_t["metric"]) == {"kl", "kl_per_norm"}


def test_bad_inputs(model, tokens):
    u = random_directions(2, model.cfg.d_model)
    with pytest.raises(ValueError, match="hook"):
        steering_effect(model, "blocks.9.hook_resid_post", u, tokens, scale=1.0)
    with pytest.raises(ValueError, match="d_model=64"):
        steering_effect(model, FIRST, torch.randn(2, 63), tokens, scale=1.0)
    with pytest.raises(ValueError, match="zero norm"):
        steering_effect(model, FIRST, torch.zeros(2, 64), tokens, scale=1.0)
    with pytest.raises(ValueError, match="positions"):
        steering_effect(model, FIRST, u, tokens, scale=1.0, positions="first")
    with pytest.raises(ValueError, match="targets"):
        steering_effect(model, FIRST, u, tokens, scale=1.0, targets=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="targets"):
        steering_effect(model, FIRST, u, tokens, scale=1.0, targets=torch.tensor([1, 999]))
    with pytest.raises(ValueError, match="tokens"):
        steering_effect(model, FIRST, u, tokens.float(), scale=1.0)
    with pytest.raises(ValueError, match="tokens"):
        steering_effect(model, FIRST, u, tokens + 1000, scale=1.0)
    with pytest.raises(ValueError, match="scale"):
        steering_effect(model, FIRST, u, tokens, scale=float("nan"))
    with pytest.raises(ValueError, match="batch_size"):
        steering_effect(model, FIRST, u, tokens, scale=1.0, batch_size=0)


def test_live_latents_draws_only_live_ones():
    density = torch.tensor([0.0, 0.1, 0.0, 0.2, 0.3, 0.0])
    assert live_latents(density, 3, seed=0).tolist() == [1, 3, 4]  # all live ones, sorted
    big = torch.zeros(1000)
    big[::7] = 0.01  # 143 live latents
    a, b = live_latents(big, 20, seed=1), live_latents(big, 20, seed=1)
    assert torch.equal(a, b) and a.dtype == torch.long and len(a.unique()) == 20
    assert (a % 7 == 0).all() and torch.equal(a, a.sort().values)
    assert not torch.equal(a, live_latents(big, 20, seed=2))
    with pytest.raises(ValueError, match="n=4"):
        live_latents(density, 4)
    with pytest.raises(ValueError, match="n=0"):
        live_latents(density, 0)
    with pytest.raises(ValueError, match="density"):
        live_latents(density[None], 1)


def test_steering_from_the_hooked_block_equals_steering_the_whole_forward(model, tokens):
    dirs = random_directions(2, model.cfg.d_model, seed=7)
    res = steering_per_position(model, FIRST, dirs, tokens, scale=4.0)
    with torch.no_grad():
        clean = model(tokens).double().log_softmax(-1)
        for j in range(2):
            steered = model.run_with_hooks(tokens, fwd_hooks=[(FIRST, _add_hook(dirs[j:j + 1], 4.0, "all", 4))])
            kl = (clean.exp() * (clean - steered.double().log_softmax(-1))).sum(-1)  # [n_ctx, L]
            torch.testing.assert_close(res.kl[j], kl, atol=1e-6, rtol=1e-4)


def test_paired_steering_scores_each_direction_against_its_random_pair(model, tokens):
    targets = torch.tensor([5, 65, 200])
    aligned = model.W_U.detach().T[targets]  # promote their tokens
    rand = random_directions(2, model.cfg.d_model, seed=11)
    out = paired_steering(model, LAST, {"aligned": aligned, "other": rand}, tokens, scales=[10.0, 40.0], seed=3)
    assert list(out["group"].unique()) == ["aligned", "other", "random"]
    assert len(out) == (3 + 2 + 3) * 2  # every direction at every scale; 3 random ones (the largest group)
    assert (out["pair"] == out["direction"]).all()
    baseline = random_directions(3, model.cfg.d_model, seed=3)
    ref = steering_effect(model, LAST, baseline, tokens, scale=40.0, targets=top_promoted_token(model, baseline))
    row = out[(out["group"] == "aligned") & (out["direction"] == 2) & (out["scale"] == 40.0)].iloc[0]
    assert row["random_kl"] == pytest.approx(ref["kl"][2], rel=1e-9)
    assert row["log_kl_ratio"] == pytest.approx(float(torch.tensor(row["kl"] / ref["kl"][2]).log()), rel=1e-9)
    assert row["target_gain"] == pytest.approx(row["target_logprob_delta"] - ref["target_logprob_delta"][2])
    rnd = out[out["group"] == "random"]
    assert (rnd["log_kl_ratio"].abs() < 1e-12).all() and (rnd["target_gain"].abs() < 1e-12).all()
    assert (out[out["group"] == "aligned"]["target_gain"] > 1.0).all()  # far above any direction of that norm
    per = per_direction(out)
    assert len(per) == 8 and list(per.columns) == ["group", "direction", "log_kl_ratio", "target_gain"]
    mine = out[(out["group"] == "other") & (out["direction"] == 1)]
    got = per[(per["group"] == "other") & (per["direction"] == 1)].iloc[0]
    assert got["target_gain"] == pytest.approx(mine["target_gain"].mean())  # averaged over the scales


def test_paired_steering_rejects_bad_groups_and_scales(model, tokens):
    u = random_directions(2, model.cfg.d_model)
    with pytest.raises(ValueError, match="other than 'random'"):
        paired_steering(model, LAST, {"random": u}, tokens, scales=[1.0])
    with pytest.raises(ValueError, match="other than 'random'"):
        paired_steering(model, LAST, {}, tokens, scales=[1.0])
    for scales in ([], [0.0], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="scales="):
            paired_steering(model, LAST, {"a": u}, tokens, scales=scales)
    with pytest.raises(ValueError, match="missing columns"):
        per_direction(steering_effect(model, LAST, u, tokens, scale=1.0))
