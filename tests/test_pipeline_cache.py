"""The Prefect skeleton: stage tasks cached by fingerprint, results on the configured storage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cyclej.config import load_config
from cyclej.pipeline.registry import fingerprints
from tests.conftest import task_run_states


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("where", ["local", "s3"])
def test_second_run_is_cached_and_a_data_option_reruns(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from flows.pipeline_flow import cyclej_pipeline

    root = str(tmp_path / "store") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/runs"
    cfg = load_config(preset="tiny", storage=root)

    first = cyclej_pipeline(config=cfg, until="data", return_state=True)
    assert first.is_completed()
    refs = first.result()
    assert list(refs) == ["data"] and refs["data"]["fingerprint"] == fingerprints(cfg)["data"]
    assert task_run_states(first.state_details.flow_run_id) == {"data": "Completed"}
    manifest_sha = refs["data"]["manifest_sha256"]
    # The persisted Prefect result is the JSON ArtifactRef, on the same storage as the artifacts.
    from cyclej.runtime.store import ArtifactStore

    store = ArtifactStore.from_config(cfg.storage)
    record = json.loads(
        store.fs.cat_file(f"{store.root}/_prefect/results/data-{refs['data']['fingerprint']}")
    )
    assert record["metadata"]["serializer"]["type"] == "json"
    assert json.loads(record["result"]) == refs["data"]

    second = cyclej_pipeline(config=cfg, until="data", return_state=True)
    assert task_run_states(second.state_details.flow_run_id) == {"data": "Cached"}
    assert second.result()["data"]["manifest_sha256"] == manifest_sha  # no new commit: no work done

    changed = cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_train_lines": 300})})
    third = cyclej_pipeline(config=changed, until="data", return_state=True)
    assert task_run_states(third.state_details.flow_run_id) == {"data": "Completed"}
    assert third.result()["data"]["fingerprint"] != refs["data"]["fingerprint"]
    assert third.result()["data"]["metrics"]["a_train_lines"] == 300


@pytest.mark.usefixtures("prefect_harness")
def test_record_without_artifact_is_not_trusted(tmp_path: Path) -> None:
    """If the artifact vanished from the store, Prefect must not hand back its old ref."""
    import shutil

    from flows.pipeline_flow import cyclej_pipeline

    cfg = load_config(preset="tiny", storage=str(tmp_path / "store"))
    first = cyclej_pipeline(config=cfg, until="data", return_state=True).result()
    shutil.rmtree(tmp_path / "store" / "data")
    again = cyclej_pipeline(config=cfg, until="data", return_state=True)
    assert task_run_states(again.state_details.flow_run_id) == {"data": "Completed"}
    assert (tmp_path / "store" / "data" / first["data"]["fingerprint"] / "MANIFEST.json").is_file()
