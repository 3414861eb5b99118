"""Built models are cached per library versions: a folder written by another transformers/torch release
is never reused as if this one had built it."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import pytest

from cyclej.models.catalog import resolve_model


def test_built_model_folder_is_keyed_by_transformers_and_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CYCLEJ_CACHE", str(tmp_path))
    # What an older release left: the unversioned folder name, marked complete, holding nothing usable.
    stale = tmp_path / "models" / "tiny-gptj-v1"
    stale.mkdir(parents=True)
    (stale / ".complete").write_text("ok")

    built = Path(resolve_model("tiny-gptj"))
    assert built != stale
    assert f"transformers{version('transformers')}" in built.name and f"torch{version('torch')}" in built.name
    assert (built / "config.json").is_file() and (built / "model.safetensors").is_file()
    assert resolve_model("tiny-gptj") == str(built)  # built once, then reused
