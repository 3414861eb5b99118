"""Shared fixtures: every test runs offline, without Prefect analytics, with a private model cache."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def hf_offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Nothing may download weights: the hub is off, and Prefect does not phone home."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.delenv("CYCLEJ_FAULT", raising=False)
    yield


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache of built tiny models for the whole session (built once, shared by every test)."""
    return tmp_path_factory.mktemp("cyclej-cache")


@pytest.fixture(autouse=True)
def cyclej_cache(monkeypatch: pytest.MonkeyPatch, model_cache: Path) -> Path:
    """CYCLEJ_CACHE points at the session cache, never at the user's home."""
    monkeypatch.setenv("CYCLEJ_CACHE", str(model_cache))
    return model_cache
