"""`cyclej plan` at a world size: memory per GPU on N ranks (data-parallel LoRA stages, FSDP2 RL), the pod's
price (N × the GPU's), its RAM/vCPU/disk for N rank processes, and the smallest pod that fits without
optimizer offload (cyclej/pipeline/sizing.py, "World size")."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from cyclej.config import load_config
from cyclej.errors import BadInput
from cyclej.pipeline.sizing import GiB, StagePlan, _fit_rl, format_plan, load_prices, plan
from cyclej.runtime.distributed import DATA_PARALLEL_STAGES, GPUS_ENV, MULTI_GPU_STAGES


@pytest.fixture(autouse=True)
def _no_pod_gpu_count(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(GPUS_ENV, raising=False)  # a developer's own CYCLEJ_GPUS would change every plan
    yield


def _plans(*overrides: str) -> dict[str, StagePlan]:
    return {p.stage: p for p in plan(load_config(preset="gptj", overrides=list(overrides)))}


def _price(gpu_id: str) -> float:
    return next(g.hourly_usd for g in load_prices().gpus if g.id == gpu_id)


def test_world_size_one_spelled_out_is_the_single_gpu_plan() -> None:
    default = _plans()
    ones = _plans(*(f"resources.gpus.{s}=1" for s in sorted(MULTI_GPU_STAGES)))
    for stage, p in default.items():
        q = ones[stage]
        assert (q.memory, q.host, q.disk, q.vcpus, q.job_variables()) == (
            p.memory,
            p.host,
            p.disk,
            p.vcpus,
            p.job_variables(),
        ), stage
        if p.device == "gpu":
            assert p.job_variables()["gpu_count"] == (p.gpu_count if stage == "paraphrase" else 1)


def test_a_lora_stage_on_four_ranks_takes_its_share_of_the_batch_and_one_all_reduce_buffer() -> None:
    # batch 8 over 4 ranks: 2 rows per rank, under the configured micro-batch 4.
    sets = ["para_train.batch_size=8", "para_train.micro_batch_size=4"]
    one, four = _plans(*sets)["para_train"], _plans(*sets, "resources.gpus.para_train=4")["para_train"]
    assert (one.micro_batch, four.micro_batch) == (4, 2)
    # Activations are linear in the micro-batch (checkpointing keeps layer inputs + one layer + logits).
    assert four.memory["activations"] == pytest.approx(one.memory["activations"] / 2)
    assert four.memory["weights"] == one.memory["weights"]  # every rank holds the whole base
    assert (
        four.memory["all-reduce buffer"] == four.trainable_params * 4
        and "all-reduce buffer" not in one.memory
    )
    assert four.gpu is not None and four.gpu_count == 4
    assert four.hourly_usd == pytest.approx(4 * four.gpu.hourly_usd)
    jv = four.job_variables()
    assert jv["gpu_count"] == 4 and jv["min_vcpu_count"] == 4 * one.vcpus
    # each rank loads its own copy of the model on the host; the disk is shared
    assert four.host["load the model × 4 ranks"] == pytest.approx(4 * one.host["load the model"])
    assert four.host_bytes > 3 * one.host_bytes
    assert four.disk == one.disk and four.checkpoint_bytes == one.checkpoint_bytes


def test_rl_on_four_ranks_shards_weights_gradients_and_moments_onto_80gb_cards() -> None:
    one, four = _plans()["rl"], _plans("resources.gpus.rl=4")["rl"]
    params = four.params
    shards = sum(v for k, v in four.memory.items() if "shard" in k)
    assert shards == pytest.approx(16 * params / 4)  # fp32 weights 4 + fp32 gradients 4 + moments 8, over 4
    assert four.memory["gathered weights (bf16)"] == 2 * params  # the rollouts' full weights
    assert four.memory["activations"] == one.memory["activations"]  # 1 group per chunk either way
    assert four.gpu is not None and four.gpu.memory_gb == 80 and four.gpu_count == 4
    assert four.total_bytes + GiB <= 0.95 * 80 * GiB
    assert four.hourly_usd == pytest.approx(4 * _price(four.gpu.id))
    # No offloaded optimizer in the pod's RAM: four fp32 loads (one per rank) instead of 12 bytes/parameter.
    assert "policy: fp32 load, masters + moments" not in four.host
    assert four.host["policy: fp32 load × 4 ranks"] == pytest.approx(4 * 4 * params)
    assert four.vcpus == 4 * 8  # GPU_VCPUS per rank; no CPU AdamW step
    assert four.disk == one.disk and four.checkpoint_bytes == one.checkpoint_bytes
    jv = four.job_variables()
    assert jv["gpu_count"] == 4 and jv["gpu_type_id"] == four.gpu.id
    assert (
        jv["min_memory_in_gb"] == math.ceil(four.host_bytes / GiB)
        and jv["container_disk_gb"] == one.job_variables()["container_disk_gb"]
    )
    # On two ranks the shards (8 bytes/parameter, 45 GiB) + the gathered weights + vLLM's quarter overflow
    # 80 GB.
    two = _plans("resources.gpus.rl=2")["rl"]
    assert two.gpu is not None and two.gpu.memory_gb > 80 and two.gpu_count == 2


def test_the_smallest_pod_without_offload_is_named_for_rl_and_only_differing_pods_are_printed() -> None:
    cfg = load_config(preset="gptj")
    plans = {p.stage: p for p in plan(cfg)}
    # the training stages, whose memory per GPU falls with N; paraphrase's N workers each hold a whole engine
    assert {
        s for s, p in plans.items() if p.smallest_pod is not None
    } == MULTI_GPU_STAGES - DATA_PARALLEL_STAGES
    rl = plans["rl"]
    pod = rl.smallest_pod
    assert pod is not None and pod.gpu is not None
    # MasterAdamW on the GPU (16 bytes/parameter, 90 GiB) + the rest fits no single card of the table ...
    assert _fit_rl(cfg, 1, False, load_prices(), math.inf)[0] is None
    # ... so the smallest pod has several GPUs, and is the plan at that world size with offload off.
    assert pod.gpu_count == 2 and pod.name == "resources.gpus.rl: 2"  # offload is ignored on N ranks
    at_two = _plans("resources.gpus.rl=2", "rl.optimizer_offload=false")["rl"]
    assert (at_two.gpu, at_two.gpu_count) == (pod.gpu, pod.gpu_count) and at_two.memory == pod.memory
    for stage in ("context", "para_train", "domain_train"):  # on one GPU a LoRA stage is its own smallest pod
        p = plans[stage]
        assert p.smallest_pod is not None and (p.smallest_pod.gpu_count, p.smallest_pod.gpu) == (1, p.gpu)
    text = format_plan(list(plans.values()))
    assert f"smallest pod without optimizer offload: 2× {pod.gpu.id}" in text
    assert "    smallest pod:" not in text
    wide = format_plan(list(_plans("resources.gpus.para_train=4").values()))
    assert f"    smallest pod: 1× {plans['para_train'].gpu.id}" in wide
    assert "set resources.gpus.para_train: 1" in wide


def test_cyclej_gpus_on_the_machine_sets_every_multi_gpu_stages_world(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(GPUS_ENV, "4")
    plans = {p.stage: p for p in plan(load_config(preset="gptj"))}
    for stage in MULTI_GPU_STAGES:
        assert plans[stage].gpu_count == 4, stage
    assert plans["eval"].gpu_count == 1  # one engine, one GPU
    assert "4 data-parallel workers, one engine per GPU" in " ".join(plans["paraphrase"].notes)


def test_several_gpus_for_a_one_device_stage_are_refused() -> None:
    with pytest.raises(BadInput, match="resources.gpus.eval"):
        plan(load_config(preset="gptj", overrides=["resources.gpus.eval=2"]))


def test_cli_plan_prints_the_pod_at_the_configured_world_size() -> None:
    from cyclej.cli import app

    result = CliRunner().invoke(app, ["plan", "--preset", "gptj", "--set", "resources.gpus.rl=4"])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.startswith("rl "))
    jv = _plans("resources.gpus.rl=4")["rl"].job_variables()
    assert f"4× {jv['gpu_type_id']}" in row and f"{4 * _price(str(jv['gpu_type_id'])):.2f}" in row.split()
    ram, vcpu, disk = (int(x) for x in row.split()[-4:-1])
    assert (ram, vcpu, disk) == (jv["min_memory_in_gb"], jv["min_vcpu_count"], jv["container_disk_gb"])
    assert "4 ranks (FSDP2)" in result.output and "× 4 ranks" in result.output
