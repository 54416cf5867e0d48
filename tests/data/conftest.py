"""Every data test gets its own empty cache folder, so nothing reads or writes the user's ~/.cache."""

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLMSCRATCH_CACHE", str(cache))
    return cache
