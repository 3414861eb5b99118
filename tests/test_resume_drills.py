"""Kill drills across stage boundaries: a stage killed outright (SIGKILL, like a lost pod) and resumed by
a new process must leave both its own output and the output of the stage that runs after it in that same
process bit-identical to a run that never stopped (CPU, same seed, two torch threads as a user's machine
has). The drill machinery is `bench/kill_drill.py`'s, which runs the same drill at random over every
stage pair.

Issue 16 found `domain_train` (never killed) differing after a resumed `para_train`: not a leak between
stages but a race in the marker rows' gradient on CPU threads, which the first test pins down directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bench.kill_drill import build_reference, committed_dir, content_digest, drill
from cyclej.training.trainer import MarkerRows
from tests.helpers.tiny_models import tiny_gptj

DRILL_THREADS = 2  # the race needs more than one thread; one thread would hide it


@pytest.fixture
def two_torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(DRILL_THREADS)
    yield
    torch.set_num_threads(before)


def test_marker_rows_gradient_is_the_same_every_time(two_torch_threads: None) -> None:
    """Many positions of a micro-batch add into the same two marker rows. Summed with atomic adds across
    threads (the old `input_rows[slot]` gather) the result changed from run to run in the last bits."""
    model = tiny_gptj()
    markers = [1000, 1001]
    rows = MarkerRows(model, markers)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 1000, (4, 128), generator=generator)
    ids[:, ::7], ids[:, 3::11] = markers[0], markers[1]  # ~30 marker positions per row
    weights = torch.randn(4, 128, 1024, generator=generator)

    def marker_grad() -> torch.Tensor:
        rows.input_rows.grad = None
        (model(input_ids=ids).logits * weights).sum().backward()
        assert rows.input_rows.grad is not None
        return rows.input_rows.grad.clone()

    first = marker_grad()
    assert first.abs().sum() > 0
    differing = sum(not torch.equal(first, marker_grad()) for _ in range(20))
    assert differing == 0, f"{differing} of 20 backward passes gave other marker-row gradients"


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline through `merge`, never interrupted, in its own process."""
    store = tmp_path_factory.mktemp("uninterrupted") / "store"
    build_reference(store, "merge", threads=DRILL_THREADS)
    return store


@pytest.mark.parametrize(
    ("killed", "step", "following"),
    [
        # issue 16's case: resumed at step 4, then domain_train
        pytest.param("para_train", 5, "domain_train", marks=pytest.mark.slow),
        # resumed at step 2, then the merge of both adapters
        pytest.param("domain_train", 3, "merge", marks=pytest.mark.slow),
        pytest.param("context", 3, "paraphrase", marks=pytest.mark.slow),
        pytest.param("paraphrase", 2, "para_train", marks=pytest.mark.slow),
    ],
)
def test_killed_stage_and_the_next_one_end_bit_identical(
    reference_store: Path, tmp_path: Path, killed: str, step: int, following: str
) -> None:
    result = drill(reference_store, tmp_path / "store", killed, step, following, threads=DRILL_THREADS)
    assert result.killed_rc == -9, result.error
    assert not result.error, result.error
    assert result.identical == {killed: True, following: True}
    # the comparison is of real content: weights or generated text, not an empty digest
    digest = content_digest(committed_dir(tmp_path / "store", following))
    assert any(name.endswith((".safetensors", ".jsonl")) for name in digest), digest


@pytest.mark.slow  # needs the 90 s uninterrupted reference pipeline the drills share
def test_drill_comparison_notices_a_changed_weight(reference_store: Path, tmp_path: Path) -> None:
    """The digest the drills compare must see a one-bit change in a weight file."""
    import shutil

    copy = tmp_path / "merge"
    shutil.copytree(committed_dir(reference_store, "merge"), copy)
    weights = copy / "model" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0x01
    weights.write_bytes(bytes(raw))
    assert content_digest(copy) != content_digest(committed_dir(reference_store, "merge"))
