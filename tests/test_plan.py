"""swav-scale plan: the engines' arithmetic, activations measured on fake tensors, the verdict and its suggestions,
the command, and the plan's peak against a CPU process's measured peak (swav_testing/plan_memory.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO
from swav_scale.cli import main
from swav_scale.config import ConfigError, load_config
from swav_scale.plan import Cluster, Measurements, plan, plan_with_suggestions
from swav_testing.plan_memory import measured_peak, planned_peak

SMALL = ["data.train_shards=x", "model.arch=resnet18", "model.width=0.5", "crops.sizes=[64,32]", "crops.counts=[2,4]",
         "model.hidden_dims=[512]", "model.num_prototypes=300", "optim.name=sgd"]
MEASURED = Measurements()  # shared: most plans below share their measured steps


def planned(overrides: list[str], nodes: int = 2, gpus: int = 8, memory: float = 80, **kw: object):
    return plan(load_config(None, [*SMALL, "optim.batch_size=256", *overrides]), Cluster(nodes, gpus, memory),
                measured=MEASURED, **kw)


def line(lines, name):
    return next(x.bytes for x in lines if x.name == name)


def test_fsdp_state_is_ddps_over_the_shard_group() -> None:
    ddp = planned(["parallel.engine=ddp"]).memory
    fsdp = planned(["parallel.engine=fsdp", "parallel.fsdp_shard_group=0", "parallel.precision=fp32"]).memory
    assert line(fsdp.resident, "parameter shards") == pytest.approx(line(ddp.resident, "parameters") / 16, rel=0.01)
    assert line(fsdp.resident, "optimizer state") == pytest.approx(line(ddp.resident, "optimizer state") / 16,
                                                                   rel=0.01)


def test_hsdp_shards_over_a_node_and_replicates_across_nodes() -> None:
    p = planned(["parallel.engine=fsdp", "parallel.fsdp_shard_group=8"], nodes=4)
    assert (p.layout.shard, p.layout.replicas) == (8, 4)
    assert any("HSDP" in c.what and c.ranks == 4 for c in p.collectives)
    # -1 (default): all ranks up to 64, a node's beyond
    assert planned(["parallel.engine=fsdp"], nodes=8).layout.shard == 64
    assert planned(["parallel.engine=fsdp"], nodes=16).layout.shard == 8


def test_zero_stages_shard_more_state_in_turn() -> None:
    peaks = [planned(["parallel.engine=deepspeed", f"parallel.zero_stage={s}", "optim.name=adamw"]).memory
             for s in (1, 2, 3)]
    resident = [m.total(m.resident) for m in peaks]
    assert resident[0] == resident[1] > resident[2]  # 1 and 2 keep the whole 'bit16' copy
    stage1_grads = line(peaks[0].optimizer_step, "gradients")
    stage2_grads = line(peaks[1].optimizer_step, "gradient partition")
    assert stage2_grads < stage1_grads / 8
    assert any(x.name == "prototypes (replicated)" for x in peaks[2].resident)


def test_adamw_keeps_two_copies_and_sgd_one() -> None:
    assert planned(["optim.name=adamw"]).optimizer.state_copies == 2
    assert planned(["optim.name=sgd"]).optimizer.state_copies == 1


def test_activations_grow_linearly_with_the_batch() -> None:
    fb = [planned([], memory=80, nodes=1, gpus=g).memory for g in (16, 8, 4)]  # 16, 32, 64 images per rank
    acts = [line(m.forward_backward, "activations") for m in fb]
    assert acts[0] < acts[1] < acts[2]
    assert (acts[2] - acts[1]) == pytest.approx(2 * (acts[1] - acts[0]), rel=0.1)


def test_activation_checkpointing_lowers_the_activations() -> None:
    off = line(planned([]).memory.forward_backward, "activations")
    block = line(planned(["parallel.activation_checkpointing=block"]).memory.forward_backward,
                 "activations")
    stage = line(planned(["parallel.activation_checkpointing=stage"]).memory.forward_backward,
                 "activations")
    assert block < off and stage < off  # a stage recomputed whole may peak above its blocks recomputed one by one


def test_a_config_that_does_not_fit_gets_re_planned_changes() -> None:
    cfg = load_config(None, [*SMALL, "optim.batch_size=256", "parallel.engine=ddp", "parallel.precision=fp32"])
    full = plan(cfg, Cluster(1, 2, 80), measured=MEASURED).memory
    tight = (full.peak - 0.3 * full.tensors_peak) / 2**30  # 30% of the tensors' peak short
    result = plan_with_suggestions(cfg, Cluster(1, 2, tight))
    assert not result.fits
    changes = [" ".join(s.change) for s in result.suggestions]
    assert "parallel.activation_checkpointing=selective" in changes and "parallel.precision=bf16" in changes
    assert any(s.change[0].startswith("--nodes") and s.fits for s in result.suggestions)
    assert all(s.peak_gib < result.memory.peak / 2**30 for s in result.suggestions if s.peak_gib == s.peak_gib)
    assert plan_with_suggestions(cfg, Cluster(1, 2, 80)).fits


def test_bad_input_names_the_key() -> None:
    with pytest.raises(ConfigError, match="parallel.fsdp_shard_group=3"):
        planned(["parallel.engine=fsdp", "parallel.fsdp_shard_group=3"])
    with pytest.raises(ConfigError, match="--gpu-memory"):
        planned([], memory=0)


def test_the_command_prints_the_plan_and_its_json(capsys: pytest.CaptureFixture[str]) -> None:
    """As a user runs it (a process of its own), and its JSON through the same entry point in this process."""
    plan_args = ["plan", str(REPO / "configs" / "quickstart.yaml"), "--nodes", "2", "--gpus-per-node", "4",
                 "--gpu-memory", "16"]
    args = [sys.executable, "-m", "swav_scale.cli", *plan_args]
    text = subprocess.run(args, cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "verdict: FITS" in text and "communication per step" in text and "CUDA context" in text
    main([*plan_args, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["ranks"] == 8 and out["fits"] and out["peak_bytes"] > out["tensors_peak_bytes"]
    bad = subprocess.run([*args, "parallel.engine=nope"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "parallel.engine" in bad.stdout and "Traceback" not in bad.stdout


# (benchmarks/bench_plan_memory.py measures more: other batches and optimizers, a ResNet without checkpointing)
VALIDATED = [["model.arch=regnety_400mf", "model.width=null", "optim.batch_size=16"],
             ["model.arch=resnet18", "optim.batch_size=32", "parallel.activation_checkpointing=block"]]


@pytest.mark.parametrize("overrides", VALIDATED, ids=["regnety_400mf", "resnet18-block-ckpt"])
def test_the_plan_is_within_15_percent_of_a_cpu_processs_measured_peak(overrides: list[str]) -> None:
    config = [*(x for x in SMALL[1:] if not x.startswith("model.arch")), *overrides, "parallel.precision=fp32"]
    if "model.arch=regnety_400mf" in overrides:
        config = [x for x in config if not x.startswith("model.width")]
    measured = measured_peak(config, REPO)["peak"]
    assert planned_peak(config) == pytest.approx(measured, rel=0.15)


def test_a_recomputed_batchnorm_repeats_its_statistics_all_reduce_not_its_backward_one() -> None:
    def syncbn(overrides: list[str]) -> dict[str, int]:
        return {c.what.split(" (")[0]: c.count for c in planned(overrides).collectives if "SyncBatchNorm" in c.what}

    plain, recomputed = syncbn([]), syncbn(["parallel.activation_checkpointing=block"])
    assert plain["SyncBatchNorm statistics"] == plain["SyncBatchNorm gradient sums"]
    assert recomputed["SyncBatchNorm gradient sums"] == plain["SyncBatchNorm gradient sums"]
    # every BatchNorm but the stem's and the head's, once per crop resolution, again
    assert plain["SyncBatchNorm statistics"] < recomputed["SyncBatchNorm statistics"] < 2 * plain[
        "SyncBatchNorm statistics"]
