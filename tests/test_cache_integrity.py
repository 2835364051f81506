"""Every kind of cached artifact is checksummed: a damaged or truncated one is detected when it is
loaded and rebuilt with a warning that names the file (or, for a run's skip decision, makes the
notebook rerun). Flipped bytes and truncation, for each kind."""

from pathlib import Path

import pytest
import torch

from sae_repro import activations as A
from sae_repro import zoo
from sae_repro.activations import ActivationSpec, collect
from sae_repro.cache import file_problem, folder_problem, write_checksums, write_file_checksum
from sae_repro.figures import path_hash
from sae_repro.train import TrainConfig, train_sae

HOOK = "blocks.1.hook_resid_post"


def _flip(path: Path, at: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


DAMAGE = {"flip": _flip, "truncate": _truncate}


def test_checksum_helpers(tmp_path):
    (tmp_path / "a").write_text("one")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_text("two")
    write_checksums(tmp_path)
    assert folder_problem(tmp_path) is None
    (tmp_path / "sub" / "b").write_text("twO")
    assert "sub/b does not match" in folder_problem(tmp_path)
    (tmp_path / "sub" / "b").unlink()
    assert "sub/b is missing" in folder_problem(tmp_path)
    f = tmp_path / "f.bin"
    f.write_bytes(b"\x00" * 64)
    assert "missing" in file_problem(f)
    write_file_checksum(f)
    assert file_problem(f) is None
    _flip(f, 3)
    assert "f.bin does not match" in file_problem(f)


def _store():
    return collect(ActivationSpec(model="tiny-random", hooks=(HOOK,), n_tokens=1_024, ctx_len=32,
                                  drop_first=2, dtype="float32", contexts_per_shard=8), progress=False)


@pytest.mark.parametrize("damage", DAMAGE)
def test_trained_sae_damaged_is_retrained(isolated_cache, damage):
    store = _store()
    cfg = TrainConfig(k=4, expansion=2, batch_size=256, epochs=1.0)
    sae, _, key = zoo.trained_sae(store, cfg, hook=HOOK, progress=False)
    for name in ("sae_weights.safetensors", "cfg.json"):
        DAMAGE[damage](isolated_cache / "saes" / key / name)
        with pytest.warns(UserWarning, match=rf"trained SAE {key}: .*{name}"):
            again, _, _ = zoo.trained_sae(store, cfg, hook=HOOK, progress=False)
        assert torch.equal(again.W_dec, sae.W_dec)  # retrained: the same weights, bit for bit
        assert folder_problem(isolated_cache / "saes" / key) is None


@pytest.mark.parametrize("damage", DAMAGE)
def test_store_shard_and_manifest_damage_is_found_and_rebuilt(isolated_cache, damage):
    store = _store()
    x, digest = store.load(HOOK), path_hash(store.root)
    shard = store.shards[1]
    DAMAGE[damage](shard)
    assert path_hash(store.root) != digest  # the skip decision sees it: the notebook reruns
    with pytest.warns(UserWarning, match=rf"1 shard\(s\) damaged or missing \({shard.name}\)"):
        again = _store()
    assert torch.equal(again.load(HOOK), x) and path_hash(again.root) == digest
    DAMAGE[damage](store.root / "manifest.json")
    with pytest.warns(UserWarning, match="manifest.json is unreadable"):
        again = _store()
    assert torch.equal(again.load(HOOK), x)


@pytest.mark.parametrize("damage", DAMAGE)
def test_tokens_cache_damage_is_rebuilt(isolated_cache, damage):
    store = _store()
    (path,) = (isolated_cache / "tokens").glob("*.safetensors")
    want = A.load_file(path)["contexts"].clone()  # not a view of the file we are about to damage
    DAMAGE[damage](path)
    spec = store.spec
    with pytest.warns(UserWarning, match=rf"tokens cache: .*{path.name}"):
        got = A._tokenized(spec, A.load_corpus(spec.corpus), A.load_model("tiny-random").tokenizer)
    assert torch.equal(got, want) and file_problem(path) is None


def test_damaged_checkpoint_trains_from_the_start(tmp_path):
    x = torch.randn(2048, 16)
    cfg = TrainConfig(k=4, n_latents=32, batch_size=256, epochs=2.0, checkpoint_every=4)
    want, _ = train_sae(x, cfg, checkpoint_dir=tmp_path, progress=False)
    _truncate(tmp_path / "checkpoint.pt")
    with pytest.warns(UserWarning, match="checkpoint.pt is unreadable"):
        got, _ = train_sae(x, cfg, checkpoint_dir=tmp_path, progress=False)
    assert torch.equal(got.W_dec, want.W_dec)


def test_cached_files_have_the_modes_of_plain_files(isolated_cache):
    import os

    from sae_repro.cache import _UMASK

    store = _store()
    sae_dir = next((isolated_cache / "saes").iterdir(), None) if (isolated_cache / "saes").exists() else None
    files = [*store.shards, store.root / "manifest.json"]
    if sae_dir is None:
        _, _, key = zoo.trained_sae(store, TrainConfig(k=4, expansion=2, batch_size=256, epochs=1.0),
                                    hook=HOOK, progress=False)
        sae_dir = isolated_cache / "saes" / key
    files += list(sae_dir.iterdir())
    for f in files:
        assert os.stat(f).st_mode & 0o777 == 0o666 & ~_UMASK, f


def test_a_damaged_figures_manifest_is_named_with_what_to_do(tmp_path, monkeypatch, capsys):
    from sae_repro import cli

    monkeypatch.setenv("SAE_REPRO_FIGURES", str(tmp_path))
    (tmp_path / "manifest.json").write_text('{"a-fig": {"notebook": ')
    assert cli.main(["list", "--profile", "ci"]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'manifest.json'} is damaged" in err and "delete it" in err


def test_progress_lines_are_relayed(tmp_path, monkeypatch, capsys):
    import threading

    from sae_repro.progress import PROGRESS_ENV, Progress, relay

    path = tmp_path / "p.log"
    monkeypatch.setenv(PROGRESS_ENV, str(path))
    p = Progress("train SAE topk", total=4, every=0.0)
    for i in range(1, 5):
        p.update(i)
    stop = threading.Event()
    stop.set()
    relay(path, "  nb: ", stop, interval=0.0)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("  nb: train SAE topk: 1/4 (") and "left)" in out[0]
    assert out[-1].startswith("  nb: train SAE topk: 4/4") and out[-1].endswith("done)")
