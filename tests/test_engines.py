"""Sharded engines train exactly like DDP: FSDP2 and DeepSpeed ZeRO on real gloo ranks, same parameters after
several SwAV steps (prototype freezing and normalisation included)."""

from __future__ import annotations

import functools
import json
import math
from contextlib import ExitStack
from types import SimpleNamespace
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from device_trace import DeviceTrace, optimizer_step_counters

from torch.distributed.device_mesh import init_device_mesh

from swav_scale.build import build_model
from swav_scale.checkpoint.manager import Checkpointer
from swav_scale.checkpoint.states import TrainProgress
from swav_scale.config import load_config, rank_batch, rank_share
from swav_scale.diagnostics import code_statistics
from swav_scale.distributed import DistEnv, all_reduce_mean
from swav_scale.engines.assemble import build_engine
from swav_scale.engines.base import Engine
from swav_scale.engines.fsdp import local_rows, parallelize, shard_units
from swav_scale.models import build_swav_model
from swav_scale.optim import build_optimizer
from swav_scale.queue import FeatureQueue
from swav_scale.swav import assign_codes, normalize_prototypes_, swapped_prediction_loss
from swav_scale.preemption import StepAgreement
from swav_scale.train import StepLog, swav_step
from swav_testing.ranks import run_ranks

STEPS = 4
FREEZE = 2  # the prototypes start moving at step 2: both regimes are compared


def small_config(engine: str, optim: str, **extra: str) -> list[str]:
    overrides = {
        "data.train_shards": "unused", "model.arch": "resnet18", "model.width": "0.125", "model.small_stem": "true",
        "model.hidden_dims": "[32]", "model.embed_dim": "16", "model.num_prototypes": "12",
        "crops.sizes": "[16,8]", "crops.counts": "[2,1]", "swav.freeze_prototypes_iters": str(FREEZE),
        "optim.batch_size": "8", "optim.name": optim, "optim.base_lr": "0.2", "parallel.engine": engine,
        # the default memory format (channels-last inputs, contiguous weights under every engine). Residual
        # branches start at zero: without, this tiny network's first gradient norm is 538 (15 with), and SGD's
        # first step at lr 0.2 then magnifies a 1e-4 relative rounding difference (compiled kernels') 1000-fold
        "parallel.precision": "fp32", "model.zero_init_residual": "true", **extra,
    }
    return [f"{k}={v}" for k, v in overrides.items()]


def views_for(rank: int, step: int, batch: int = 4, sizes: tuple[int, ...] = (16, 16, 8)) -> list[torch.Tensor]:
    """This rank's crops at `step`: different on every rank and step, the same for every engine."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(batch, 3, size, size, generator=g) for size in sizes]


class Trace(NamedTuple):
    snapshots: list[dict[str, torch.Tensor]]  # parameters at the start, after the frozen steps, at the end
    grad_norms: list[float]  # measured at every step


def split_views(rank: int, world: int, step: int, of: int) -> list[torch.Tensor]:
    """Rank `rank`'s rows of the global batch that `of` ranks of views_for make, split over `world` ranks as
    config.rank_batch splits a global batch (unevenly where it does not divide)."""
    merged = [torch.cat(v) for v in zip(*(views_for(r, step) for r in range(of)))]
    sizes = [rank_batch(len(merged[0]), world, r) for r in range(world)]
    return [v.split(sizes)[rank] for v in merged]


def train_ranks(rank: int, world: int, overrides: list[str], split_of: int = 0,
                sizes: tuple[int, ...] = (16, 16, 8)) -> Trace:
    return train_engine(rank, world, overrides, split_of, sizes)[0]


def train_engine(rank: int, world: int, overrides: list[str], split_of: int = 0,
                 sizes: tuple[int, ...] = (16, 16, 8)) -> tuple[Trace, Engine]:
    """Parameters at the start, after the frozen steps and at the end, and the gradient norm of every step. A
    queue of 2 steps' embeddings joins Sinkhorn from the third step on, so the queue's scoring by the
    (sharded) prototypes is compared too. With `split_of`, the global batch of that many ranks' views is
    split over these ranks instead (split_views)."""
    cfg = load_config(None, overrides)
    torch.manual_seed(cfg.train.seed)
    engine = build_engine(cfg, build_model(cfg), DistEnv(rank, world, rank, world, torch.device("cpu")))
    global_batch = 4 * (split_of or world)
    queue = FeatureQueue(2, 2 * rank_batch(global_batch, world, rank), cfg.model.embed_dim)
    share = rank_share(global_batch, world, rank)
    snapshots, norms = [engine.full_parameters()], []
    for step in range(STEPS):
        lr = cfg.optim.base_lr * (step + 1) / STEPS  # a schedule: every engine must apply set_lr
        views = split_views(rank, world, step, split_of) if split_of else views_for(rank, step, sizes=sizes)
        if cfg.parallel.channels_last:  # as the loop gives them (device.device_views)
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        result = swav_step(engine, views, cfg.swav, step, lr, queue, measure_grad_norm=True, share=share)
        norms.append(result.grad_squares.norm())
        if step + 1 == FREEZE:
            snapshots.append(engine.full_parameters())
    return Trace(snapshots + [engine.full_parameters()], norms), engine


def pre_norm_biases(params: dict[str, torch.Tensor]) -> set[str]:
    """The biases of the head's Linears that a BatchNorm follows (`head.mlp.{i}.bias` where `head.mlp.{i+1}` has
    a 1-d weight: a BatchNorm's; a Linear's is 2-d, a ReLU has none). With `model.head_batchnorm=false` (SEER's
    head) there are none: every bias then acts on the output and is a parameter like any other."""
    found = set()
    for key in params:
        prefix, _, index = key.removesuffix(".bias").rpartition(".")
        if key.startswith("head.mlp.") and key.endswith(".bias") and index.isdigit():
            follower = params.get(f"{prefix}.{int(index) + 1}.weight")
            if follower is not None and follower.dim() == 1:
                found.add(key)
    return found


def without_pre_norm_bias(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """All but the biases that a BatchNorm follows (pre_norm_biases): the normalisation subtracts them again,
    so their gradient is zero up to rounding, which differs with the order of an all-reduce or a convolution's
    memory layout, and which AdamW normalises into steps of size lr. Any other parameter reveals a difference in
    the engines' arithmetic."""
    skip = pre_norm_biases(params)
    return {k: v for k, v in params.items() if k not in skip}


@pytest.mark.parametrize(("hidden_dims", "batchnorm", "skipped"), [
    ([32], True, {"head.mlp.0.bias"}), ([32, 24], True, {"head.mlp.0.bias", "head.mlp.3.bias"}),
    ([32, 24], False, set()), ([], True, set())])
def test_only_the_biases_a_batchnorm_follows_are_left_out_of_the_comparison(
        hidden_dims: list[int], batchnorm: bool, skipped: set[str]) -> None:
    params = dict(build_swav_model("resnet18", 0.125, True, hidden_dims, 16, 12, head_batchnorm=batchnorm)
                  .named_parameters())
    assert pre_norm_biases(params) == skipped
    assert without_pre_norm_bias(params).keys() == params.keys() - skipped


def assert_same(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor], atol: float) -> None:
    reference, other = without_pre_norm_bias(reference), without_pre_norm_bias(other)
    assert reference.keys() == other.keys()
    worst = max((reference[k] - other[k]).abs().max().item() for k in reference)
    assert worst <= atol, f"largest difference {worst:.3g}"


@functools.cache
def ddp_reference(optim: str, **extra: str) -> list[Trace]:
    return run_ranks(train_ranks, 2, small_config("ddp", optim, **extra))


@pytest.mark.parametrize("optim", ["sgd", "adamw", "lars"])
def test_fsdp_trains_like_ddp(optim: str) -> None:
    ddp = ddp_reference(optim)
    fsdp = run_ranks(train_ranks, 2, small_config("fsdp", optim))
    for rank in range(2):
        assert_same(ddp[0].snapshots[-1], fsdp[rank].snapshots[-1], atol=1e-5)
        assert_same_grad_norms(ddp[0].grad_norms, fsdp[rank].grad_norms)
    assert_prototypes_frozen_then_trained(fsdp[0].snapshots)


@pytest.mark.parametrize(("engine", "optim", "extra"), [("ddp", "lars", {}), ("fsdp", "lars", {}),
                                                       ("deepspeed", "sgd", {"parallel.zero_stage": "3"})])
def test_a_global_batch_split_unevenly_trains_like_an_even_split(engine: str, optim: str, extra: dict) -> None:
    """The same 8 samples a step on 3 ranks (3, 3, 2) as on 2 (4, 4): Sinkhorn's equipartition, the queue, the
    synchronised BatchNorm and the loss's gradient stay those of the global batch, up to rounding, whichever
    engine averages the gradients."""
    even = ddp_reference(optim)
    uneven = run_ranks(train_ranks, 3, small_config(engine, optim, **extra), 2)
    for rank in range(3):
        assert_same(even[0].snapshots[-1], uneven[rank].snapshots[-1], atol=1e-5)
        assert_same_grad_norms(even[0].grad_norms, uneven[rank].grad_norms)
    assert_prototypes_frozen_then_trained(uneven[0].snapshots)


# with a head as SEER's: two hidden layers, no BatchNorm (its first bias then compared like any parameter)
REGNET = {"model.arch": "regnety_400mf", "model.width": "null", "model.small_stem": "false",
          "model.zero_init_residual": "false", "optim.base_lr": "0.01", "model.hidden_dims": "[32,32]",
          "model.head_batchnorm": "false"}


def test_fsdp_trains_a_regnet_like_ddp_with_its_stages_as_units() -> None:
    """RegNetY-400MF with a head as SEER's (REGNET) under FSDP2 (its four stages the units, shard_units) and under
    DDP: the same training, the first gradient norm equal. An untrained RegNet on 4 samples a rank has gradient
    norms of about 3e3 (200x this ResNet's), which turn the reductions' different rounding into larger steps:
    hence 64 px crops (at 16 px its last stages see 1x1 maps), a small learning rate, a tolerance of 5e-5, and
    the gradient norm compared at the first step only (the later ones differ by 0.3%). With every stage
    recomputed in backward (activation checkpointing, the unit gathered for its backward anyway), FSDP2 trains
    bit for bit as without."""
    ddp = run_ranks(train_ranks, 2, small_config("ddp", "lars", **REGNET), 0, (64, 64, 32))
    modes = ["none", "stage"]
    runs = run_ranks(train_with_each_checkpointing, 2, small_config("fsdp", "lars", **REGNET), modes, (64, 64, 32))
    assert_checkpointing_changes_nothing(runs, modes)
    fsdp = [by_mode["none"][0] for by_mode in runs]
    assert ddp[0].grad_norms[0] == pytest.approx(fsdp[0].grad_norms[0], rel=1e-6)
    for rank in range(2):
        assert_same(ddp[0].snapshots[-1], fsdp[rank].snapshots[-1], atol=5e-5)
    assert_prototypes_frozen_then_trained(fsdp[0].snapshots)


def train_with_each_checkpointing(rank: int, world: int, overrides: list[str], modes: list[str],
                                  sizes: tuple[int, ...]) -> dict[str, tuple[Trace, dict[str, torch.Tensor]]]:
    """train_ranks under each parallel.activation_checkpointing mode in turn, in the same processes: the trace
    and the BatchNorm running statistics (and batch counters) at the end."""
    runs = {}
    for mode in modes:
        trace, engine = train_engine(rank, world, overrides + [f"parallel.activation_checkpointing={mode}"],
                                     sizes=sizes)
        runs[mode] = trace, {k: b.clone() for k, b in engine.model.named_buffers()}
    return runs


def assert_checkpointing_changes_nothing(runs: list[dict[str, tuple[Trace, dict[str, torch.Tensor]]]],
                                         modes: list[str]) -> None:
    """Every mode's run (train_with_each_checkpointing) equals the first's on every rank, bit for bit."""
    for by_mode in runs:
        (reference, statistics), *others = (by_mode[mode] for mode in modes)
        for mode, (trace, stats) in zip(modes[1:], others, strict=True):
            assert trace.grad_norms == reference.grad_norms, mode
            for before, after in zip(reference.snapshots, trace.snapshots, strict=True):
                assert all(torch.equal(before[k], after[k]) for k in before), mode
            assert stats.keys() == statistics.keys() and all(torch.equal(stats[k], statistics[k]) for k in stats)


@pytest.mark.parametrize(("engine", "extra", "modes", "sizes"), [
    ("ddp", {}, ["none", "selective", "block", "stage"], (16, 16, 8)),
    ("deepspeed", {"parallel.zero_stage": "3"}, ["none", "block"], (16, 16, 8)),
], ids=["ddp", "zero3"])
def test_activation_checkpointing_trains_bit_for_bit_as_without(engine: str, extra: dict, modes: list[str],
                                                                 sizes: tuple[int, ...]) -> None:
    """Every mode gives the run without checkpointing exactly: parameters after the frozen and the later steps,
    every gradient norm, and BatchNorm's running statistics, which the recomputation must not update a second
    time (synchronised over the ranks here: SyncBatchNorm's collectives run again in the recomputation). Under
    ZeRO-3 each layer is gathered again for the recomputation (FSDP2, on a RegNet: the test above)."""
    optim = "sgd" if engine == "deepspeed" else "lars"
    runs = run_ranks(train_with_each_checkpointing, 2, small_config(engine, optim, **extra), modes, sizes)
    assert_checkpointing_changes_nothing(runs, modes)
    assert_prototypes_frozen_then_trained(runs[0]["none"][0].snapshots)


def hsdp_layout(rank: int, world: int, overrides: list[str]) -> tuple[tuple[int, ...], list[str], list[int]]:
    """The mesh of the prototypes' weight, its placements, and the ranks this rank shares its shards with."""
    cfg = load_config(None, overrides)
    engine = build_engine(cfg, build_model(cfg), DistEnv(rank, world, rank, world, torch.device("cpu")))
    weight = engine.model.prototypes.weight
    mesh = weight.device_mesh
    return tuple(mesh.shape), [str(p) for p in weight.placements], dist.get_process_group_ranks(mesh.get_group(1))


@pytest.mark.slow
@pytest.mark.parametrize("optim", ["lars"])  # SwAV's; SGD is the same path without the trust ratio
def test_hsdp_trains_like_ddp_on_2x2_ranks(optim: str) -> None:
    """parallel.fsdp_shard_group=2 on 4 ranks: parameters sharded within ranks 0-1 and 2-3 and replicated across
    the two groups (a 2 x 2 mesh), and the same training as DDP on 4 ranks: weights, and gradient norms (each
    shard counted once, not once per replica). (AdamW is left out: on 4 ranks it turns the reduction order's
    rounding in near-zero gradients into steps of size lr, under 1-D FSDP as under HSDP.)"""
    hsdp_config = small_config("fsdp", optim, **{"parallel.fsdp_shard_group": "2"})
    layouts = run_ranks(hsdp_layout, 4, hsdp_config)
    assert [layout[2] for layout in layouts] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert all(layout[:2] == ((2, 2), ["R", "S(0)"]) for layout in layouts), layouts
    ddp = run_ranks(train_ranks, 4, small_config("ddp", optim))
    hsdp = run_ranks(train_ranks, 4, hsdp_config)
    for rank in range(4):
        assert_same(ddp[0].snapshots[-1], hsdp[rank].snapshots[-1], atol=1e-5)
        assert_same_grad_norms(ddp[0].grad_norms, hsdp[rank].grad_norms)


def trunk_gathers_per_step(rank: int, world: int, overrides: list[str]) -> tuple[int, int]:
    """(FSDP all-gathers in one step after the first, FSDP units in the trunk)."""
    cfg = load_config(None, overrides)
    torch.manual_seed(cfg.train.seed)
    engine = build_engine(cfg, build_model(cfg), DistEnv(rank, world, rank, world, torch.device("cpu")))
    queue = FeatureQueue(2, 8, cfg.model.embed_dim)
    sizes = tuple(size for size, count in zip(cfg.crops.sizes, cfg.crops.counts) for _ in range(count))
    swav_step(engine, views_for(rank, 0, sizes=sizes), cfg.swav, 0, 0.1, queue)  # FSDP initialises itself lazily
    # FSDP2's all-gather: all_gather_single from torch 2.14 on, all_gather_into_tensor before
    name = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
    gather, calls = getattr(dist, name), []
    setattr(dist, name, lambda *args, **kwargs: calls.append(1) or gather(*args, **kwargs))
    try:
        swav_step(engine, views_for(rank, 1, sizes=sizes), cfg.swav, 1, 0.1, queue)
    finally:
        setattr(dist, name, gather)
    return len(calls), len(shard_units(engine.model.trunk, cfg.parallel.fsdp_unit))


@pytest.mark.parametrize("reshard", [True, False])
def test_fsdp_gathers_each_trunk_unit_once_per_pass_whatever_the_crop_resolutions(reshard: bool) -> None:
    """Two crop resolutions, yet each stage is gathered once in forward and, unless kept gathered
    (parallel.fsdp_reshard_after_forward=false), once more in backward; the root unit once. Kept gathered, FSDP
    still trains exactly like DDP."""
    overrides = small_config("fsdp", "adamw", **{"parallel.fsdp_reshard_after_forward": str(reshard).lower()})
    for gathers, units in run_ranks(trunk_gathers_per_step, 2, overrides):
        assert gathers == (2 * units if reshard else units) + 1
    if not reshard:
        ddp, fsdp = ddp_reference("adamw"), run_ranks(train_ranks, 2, overrides)
        for rank in range(2):
            assert_same(ddp[0].snapshots[-1], fsdp[rank].snapshots[-1], atol=1e-5)
            assert_same_grad_norms(ddp[0].grad_norms, fsdp[rank].grad_norms)


def test_fsdp_with_residual_blocks_as_units_gathers_each_once_per_pass_and_trains_like_ddp() -> None:
    """parallel.fsdp_unit=block: each of the 8 blocks its own unit, each gathered once in forward and once in
    backward however many crop resolutions (the blocks take them in one call), and the training DDP's."""
    overrides = small_config("fsdp", "adamw", **{"parallel.fsdp_unit": "block"})
    for gathers, units in run_ranks(trunk_gathers_per_step, 2, overrides):
        assert (gathers, units) == (2 * 8 + 1, 8)
    ddp, fsdp = ddp_reference("adamw"), run_ranks(train_ranks, 2, overrides)
    for rank in range(2):
        assert_same(ddp[0].snapshots[-1], fsdp[rank].snapshots[-1], atol=1e-5)
        assert_same_grad_norms(ddp[0].grad_norms, fsdp[rank].grad_norms)


def test_fsdp_gathers_each_vit_block_once_per_pass_whatever_the_crop_resolutions() -> None:
    """The same for a ViT, whose blocks (timm's, made to take a list: models/vit.py) are its FSDP units."""
    overrides = small_config("fsdp", "adamw", **{"model.arch": "vit_small", "model.width": "null",
                                                 "model.small_stem": "false", "crops.sizes": "[32,16]",
                                                 "model.zero_init_residual": "false"})
    for gathers, units in run_ranks(trunk_gathers_per_step, 2, overrides):
        assert (gathers, units) == (2 * 12 + 1, 12)


@pytest.mark.slow
@pytest.mark.parametrize("engine,extra", [("ddp", {}), ("fsdp", {}), ("deepspeed", {"parallel.zero_stage": "2"})],
                         ids=["ddp", "fsdp", "zero2"])
def test_compiled_units_train_like_eager_ddp(engine: str, extra: dict[str, str]) -> None:
    """parallel.compile=true: each stage's forward is compiled (inductor) while the engine's own machinery (DDP's
    bucketed all-reduce, FSDP2's gathers and reduce-scatters, ZeRO-2's partitioned gradients) works around it;
    the parameters after the steps are eager DDP's, up to the compiled kernels' rounding (with SGD: AdamW
    divides near-zero gradients by their own size, which turns rounding into steps of size lr). That rounding
    depends on the CPU inductor generates code for (under 1.0e-4 on one Zen 4, 1.05e-4 on another, 2.81e-4 on a
    Xeon with AMX): 4e-4 is still 4 orders of magnitude below how far the steps move the parameters (4.2 at
    most). Each rank normalises with its own batch's statistics: SyncBatchNorm is refused under compile."""
    local_norms = {"parallel.sync_batchnorm": "false"}
    ddp = ddp_reference("sgd", **local_norms)
    compiled = run_ranks(train_ranks, 2, small_config(engine, "sgd", **{"parallel.compile": "true", **local_norms,
                                                                        **extra}))
    for rank in range(2):
        assert_same(ddp[0].snapshots[-1], compiled[rank].snapshots[-1], atol=4e-4)
        assert compiled[rank].grad_norms == pytest.approx(ddp[0].grad_norms, rel=4e-4)


@pytest.mark.parametrize("benchmark", [True, False])
def test_building_an_engine_sets_cudnn_benchmark_from_the_config(benchmark: bool) -> None:
    torch.backends.cudnn.benchmark = not benchmark
    try:
        cfg = load_config(None, small_config("ddp", "sgd", **{"parallel.cudnn_benchmark": str(benchmark).lower()}))
        build_engine(cfg, build_model(cfg), DistEnv(0, 1, 0, 1, torch.device("cpu")))
        assert torch.backends.cudnn.benchmark is benchmark
    finally:
        torch.backends.cudnn.benchmark = False  # torch's default, for the tests after this one


def assert_same_grad_norms(reference: list[float], other: list[float]) -> None:
    """The engine's gradient norm is the whole model's on every rank, frozen steps included (prototypes left
    out there), as DDP sees it: ZeRO and FSDP add up their shards and the replicated prototypes."""
    assert all(n > 0 for n in reference)
    assert other == pytest.approx(reference, rel=1e-5)


def assert_prototypes_frozen_then_trained(snapshots: list[dict[str, torch.Tensor]]) -> None:
    """Frozen: only normalised during the first steps; then trained by the optimizer."""
    start, frozen, end = (s["prototypes.weight"] for s in snapshots)
    assert torch.allclose(frozen, F.normalize(start, dim=1), atol=1e-6)
    assert (end - frozen).abs().max() > 1e-5  # LARS steps are small: trust ratio 0.001
    stem = "trunk.conv1.weight" if "trunk.conv1.weight" in snapshots[0] else "trunk.stem.0.weight"  # ResNet, RegNet
    assert (snapshots[1][stem] - snapshots[0][stem]).abs().max() > 1e-6  # trunk trained


@pytest.mark.parametrize(("stage", "optim"), [(1, "sgd"), (2, "adamw"), (3, "sgd"), (3, "adamw")])
def test_deepspeed_zero_trains_like_ddp(stage: int, optim: str) -> None:
    ddp = ddp_reference(optim)
    # buckets of 20k elements: the gradients are reduced in several (DeepSpeed's default would take them in one)
    overrides = small_config("deepspeed", optim, **{"parallel.zero_stage": str(stage),
                                                    "parallel.zero_bucket_elements": "20000"})
    zero = run_ranks(train_ranks, 2, overrides)
    for rank in range(2):
        assert_same(ddp[0].snapshots[-1], zero[rank].snapshots[-1], atol=1e-5)
        assert_same_grad_norms(ddp[0].grad_norms, zero[rank].grad_norms)
    assert_prototypes_frozen_then_trained(zero[0].snapshots)


def device_trace_per_step(rank: int, world: int, overrides: list[str]) -> dict[str, Any]:
    """What each SwAV step, queue full, would read back from a GPU, copy to it blocking, or mix from the host
    (tests/device_trace.py): a frozen step, a trained one, then one measuring the gradient norm (a log step),
    and the log step's report after it (StepLog.step, with rank 0's metrics file). Also the figures the
    report wrote, and the same figures taken one by one (a collective and a read each), to compare."""
    cfg = load_config(None, overrides)
    torch.manual_seed(cfg.train.seed)
    env = DistEnv(rank, world, rank, world, torch.device("cpu"))
    engine = build_engine(cfg, build_model(cfg), env)
    optimizers = [getattr(o, "optimizer", o) for o in getattr(engine, "optimizers", None) or [engine.optimizer]]
    queue = FeatureQueue(2, 4, cfg.model.embed_dim)
    seen = []
    for step, measure in ((0, False), (FREEZE, False), (FREEZE + 1, True)):
        views = views_for(rank, step)
        with DeviceTrace(host=optimizer_step_counters(optimizers)) as trace:
            result = swav_step(engine, views, cfg.swav, step, cfg.optim.base_lr, queue, measure)
        seen.append(trace.seen)
    loader = SimpleNamespace(bad_samples=rank, batches_done=50, batch=4, epoch=0)
    progress = TrainProgress()
    progress.step = FREEZE + 2
    run = SimpleNamespace(loader=loader, progress=progress, last_step=10, schedule=SimpleNamespace(warmup_steps=0))
    with ExitStack() as stack:
        log = StepLog(cfg, env, run, stack, StepAgreement())  # type: ignore[arg-type]
        with DeviceTrace(host=optimizer_step_counters(optimizers)) as trace:
            log.step(0, cfg.optim.base_lr, result, True, None)
    seen.append(trace.seen)
    separately = {"loss": all_reduce_mean(result.loss.detach().float()).item(), "bad_samples": world - 1,
                  "grad_norm": result.grad_squares.norm(),
                  **code_statistics(result.scores, result.codes, cfg.swav.temperature)}
    written = json.loads((Path(cfg.train.run_dir) / "metrics.jsonl").read_text()) if rank == 0 else None
    return {"seen": seen, "written": written, "separately": separately}


NOTHING = {"reads": [], "copies": [], "mixes": []}


@pytest.mark.parametrize(("engine", "optim", "extra"), [
    ("ddp", "lars", {}), ("ddp", "adamw", {}), ("fsdp", "lars", {}),
    ("deepspeed", "adamw", {"parallel.zero_stage": "2"}), ("deepspeed", "adamw", {"parallel.zero_stage": "3"})])
def test_a_step_waits_for_nothing_on_the_device_and_a_log_step_reads_once(engine: str, optim: str, extra: dict,
                                                                          tmp_path: Path) -> None:
    """No value read back, no blocking copy to the device and no host tensor meeting device ones in a step,
    on every engine, a step measuring the gradient norm included (it stays on the device): on a GPU each read
    would stall the host until the device caught up. Sinkhorn, the queue, the loss, prototype freezing and the
    optimizer step are all covered. The log step after it reads once: its figures (the loss, the code
    statistics, the gradient norm, the unreadable samples) travel in one all-reduce and come back in one
    `.tolist()`, the same figures as taken one by one."""
    overrides = small_config(engine, optim, **extra, **{"train.run_dir": str(tmp_path), "logging.tensorboard": "false"})
    results = run_ranks(device_trace_per_step, 2, overrides)
    for result in results:
        frozen, trained, measured, logged = result["seen"]
        assert frozen == trained == measured == NOTHING, (frozen, trained, measured)
        assert logged == {"reads": ["tolist"], "copies": [], "mixes": []}, logged
    written, separately = results[0]["written"], results[0]["separately"]
    assert separately["grad_norm"] > 0 and written["step"] == FREEZE + 2
    assert {k: written[k] for k in separately} == separately


def deepspeed_host_checks(rank: int, world: int, overrides: list[str]) -> list[int]:
    """How often DeepSpeed's own step tests the gradient norm on the host (`is_invalid_grad_norm`, a read of
    the device), in a frozen step, a trained one and a log step."""
    import deepspeed.runtime.zero.stage3 as stage3
    import deepspeed.runtime.zero.stage_1_and_2 as stage_1_and_2

    calls = [0]
    original = stage_1_and_2.is_invalid_grad_norm

    def counted(norm: object) -> bool:
        calls[0] += 1
        return original(norm)

    cfg = load_config(None, overrides)
    torch.manual_seed(cfg.train.seed)
    engine = build_engine(cfg, build_model(cfg), DistEnv(rank, world, rank, world, torch.device("cpu")))
    queue = FeatureQueue(2, 4, cfg.model.embed_dim)
    counts = []
    for module in (stage_1_and_2, stage3):
        module.is_invalid_grad_norm = counted  # type: ignore[attr-defined]
    try:
        for step, measure in ((0, False), (FREEZE, False), (FREEZE + 1, True)):
            calls[0] = 0
            swav_step(engine, views_for(rank, step), cfg.swav, step, cfg.optim.base_lr, queue, measure)
            counts.append(calls[0])
    finally:
        for module in (stage_1_and_2, stage3):
            module.is_invalid_grad_norm = original  # type: ignore[attr-defined]
    return counts


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_1_and_2_steps_leave_the_gradient_norm_on_the_device(stage: int) -> None:
    """ZeRO-1/2 are configured without DeepSpeed's own gradient norm, whose inf/NaN test reads the device in
    every step of its fp32 mode; the engine takes the norm at log steps only, before the step, and it is
    DDP's (test_deepspeed_zero_trains_like_ddp measures it at every step). ZeRO-3 has no such switch: its
    step still reads the norm once (docs/gpu.md)."""
    overrides = small_config("deepspeed", "adamw", **{"parallel.zero_stage": str(stage)})
    for counts in run_ranks(deepspeed_host_checks, 2, overrides):
        assert counts == ([0, 0, 0] if stage < 3 else [1, 1, 1])


def zero3_after_steps(rank: int, world: int, overrides: list[str]) -> tuple[list[bool], int]:
    """For each ZeRO-3 sub-group after a frozen and a trained step: does the fp32 master partition share its
    storage with the parameter partition? And the gradient bucket DeepSpeed was configured with."""
    cfg = load_config(None, overrides)
    torch.manual_seed(cfg.train.seed)
    engine = build_engine(cfg, build_model(cfg), DistEnv(rank, world, rank, world, torch.device("cpu")))
    queue = FeatureQueue(2, 8, cfg.model.embed_dim)
    for step in (0, FREEZE):
        swav_step(engine, views_for(rank, step), cfg.swav, step, cfg.optim.base_lr, queue)
    optimizer = engine.ds.optimizer
    shared = [master.untyped_storage().data_ptr() == partition.untyped_storage().data_ptr()
              for partition, master in zip(optimizer.fp16_partitioned_groups_flat,
                                           optimizer.fp32_partitioned_groups_flat, strict=True)]
    return shared, engine.ds.zero_reduce_bucket_size()


def test_zero3_holds_its_fp32_partition_once_and_takes_our_bucket_size() -> None:
    """The master partition is the parameter partition itself (the sharing DeepSpeed 0.19.8 means to do but
    misses; zero.share_master_partitions), and stays so through the steps. test_deepspeed_zero_trains_like_ddp
    shows the updates are still right, the resharding test that checkpoints still load."""
    results = run_ranks(zero3_after_steps, 2, small_config(
        "deepspeed", "adamw", **{"parallel.zero_stage": "3", "parallel.zero_bucket_elements": "12345"}))
    for shared, bucket in results:
        assert shared and all(shared), shared
        assert bucket == 12345


# ---- resharding: save on 2 ranks, resume on 1 and on 3
#
# Every rank trains on the same views here, which makes a step independent of the world size (BatchNorm sees
# the same per-rank batch; Sinkhorn's solution is the same for a batch repeated on every rank; gradients average
# to the same). So one step after resuming on 1 or 3 ranks must equal the step the 2-rank run took after saving:
# with AdamW, whose step is dominated by its moment estimates, only if the optimizer state was carried over.

QUEUE = 24  # global rows: 12 per rank on 2 ranks, 24 on 1, 8 on 3


def reshard_config(engine: str, optim: str, stage: int, world: int) -> list[str]:
    # parallel.zero_stage is read by the deepspeed engine only
    return small_config(engine, optim, **{"parallel.zero_stage": str(stage), "optim.batch_size": str(4 * world),
                                          "swav.queue_length": str(QUEUE)})


def setup_run(rank: int, world: int, overrides: list[str]):
    cfg = load_config(None, overrides)
    torch.manual_seed(cfg.train.seed)
    env = DistEnv(rank, world, rank, world, torch.device("cpu"))
    engine = build_engine(cfg, build_model(cfg), env)
    return cfg, env, engine, FeatureQueue(2, QUEUE // world, cfg.model.embed_dim)


def queue_copy(queue: FeatureQueue) -> dict:
    return {"embeddings": queue.embeddings.clone(), "filled": queue.filled}


def save_on_ranks(rank: int, world: int, overrides: list[str], root: str) -> dict:
    cfg, env, engine, queue = setup_run(rank, world, overrides)
    for step in range(STEPS):
        swav_step(engine, views_for(0, step), cfg.swav, step, cfg.optim.base_lr, queue)
    Checkpointer(root, env).save(STEPS, {"engine": engine, "progress": TrainProgress()}, {"queue": queue})
    saved = {"params": engine.full_parameters(), "queue": queue_copy(queue)}
    swav_step(engine, views_for(0, STEPS), cfg.swav, STEPS, cfg.optim.base_lr, None)
    return saved | {"next": engine.full_parameters()}


def resume_on_ranks(rank: int, world: int, overrides: list[str], root: str) -> dict:
    cfg, env, engine, queue = setup_run(rank, world, overrides)
    checkpointer = Checkpointer(root, env)
    checkpointer.load(checkpointer.latest(), {"engine": engine, "progress": TrainProgress()}, {"queue": queue})
    resumed = {"params": engine.full_parameters(), "queue": queue_copy(queue)}
    swav_step(engine, views_for(0, STEPS), cfg.swav, STEPS, cfg.optim.base_lr, None)
    return resumed | {"next": engine.full_parameters()}


def filled_rows(queue_states: list[dict]) -> torch.Tensor:
    return torch.cat([s["embeddings"][:, : s["filled"]] for s in queue_states], dim=1)


@pytest.mark.parametrize(("engine", "stage"), [("ddp", 2), ("fsdp", 2), ("deepspeed", 2), ("deepspeed", 3)])
def test_checkpoint_saved_on_2_ranks_resumes_on_1_and_3(tmp_path: Path, engine: str, stage: int) -> None:
    saved = run_ranks(save_on_ranks, 2, reshard_config(engine, "adamw", stage, 2), str(tmp_path))
    for world in (1, 3):
        resumed = run_ranks(resume_on_ranks, world, reshard_config(engine, "adamw", stage, world), str(tmp_path))
        for r in resumed:
            assert_same(saved[0]["params"], r["params"], atol=0.0)
            assert_same(saved[0]["next"], r["next"], atol=1e-5)
        # the queue is resharded, not cut: every old row is in the new ranks' queues, in order
        assert torch.equal(filled_rows([s["queue"] for s in saved]), filled_rows([r["queue"] for r in resumed]))


@pytest.mark.slow
def test_an_hsdp_checkpoint_resumes_on_another_mesh_shape(tmp_path: Path) -> None:
    """Saved by HSDP on 4 ranks as 2 x 2, resumed by FSDP over 2 ranks (1-D) and by DDP on 1: the same weights,
    and the same next step."""
    queue = ["swav.queue_length=48"]  # a multiple of the global batch of 4 ranks (16)
    saved = run_ranks(save_on_ranks, 4, reshard_config("fsdp", "adamw", 2, 4) + ["parallel.fsdp_shard_group=2"]
                      + queue, str(tmp_path))
    for engine, world in (("fsdp", 2), ("ddp", 1)):
        resumed = run_ranks(resume_on_ranks, world, reshard_config(engine, "adamw", 2, world) + queue,
                            str(tmp_path))
        for r in resumed:
            assert_same(saved[0]["params"], r["params"], atol=0.0)
            assert_same(saved[0]["next"], r["next"], atol=1e-5)


def test_zero_with_sgd_refuses_another_world_size_clearly(tmp_path: Path) -> None:
    run_ranks(save_on_ranks, 2, reshard_config("deepspeed", "sgd", 2, 2), str(tmp_path))
    with pytest.raises(AssertionError, match="universal checkpoint, which carries Adam-family optimizer state only"):
        run_ranks(resume_on_ranks, 1, reshard_config("deepspeed", "sgd", 2, 1), str(tmp_path))


def bf16_units_ranks(rank: int, world: int, overrides: list[str]) -> dict:
    """A few steps with the trunk's units gathered in bf16 (the GPU policy; on CPU here), BatchNorm in fp32."""
    cfg = load_config(None, overrides)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    parallelize(model, init_device_mesh("cpu", (world,)), bf16_params=True)
    seen: dict[str, torch.dtype] = {}

    def record(name: str):
        def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            seen[name] = module.weight.dtype
        return hook

    model.trunk.layer1[0].conv1.register_forward_hook(record("conv"))
    model.trunk.layer1[0].bn1.register_forward_hook(record("bn"))
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    losses = []
    for step in range(STEPS):
        normalize_prototypes_(local_rows(model.prototypes.weight))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            # 32 px: oneDNN's bf16 weight gradient of layer4's 2x2 -> 1x1 convolution (16 px crops) is sometimes
            # garbage on CPU, whatever the engine
            views = [F.interpolate(v, scale_factor=2) for v in views_for(rank, step)]
            _, scores = model([v.contiguous(memory_format=torch.channels_last) for v in views])
        loss = swapped_prediction_loss(scores, assign_codes(scores, [0, 1]), 0.1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    stored = {p.dtype for p in model.parameters()}
    return {"seen": seen, "stored": stored, "losses": losses}


def test_fsdp_bf16_policy_gathers_trunk_in_bf16_and_keeps_batchnorm_fp32() -> None:
    result = run_ranks(bf16_units_ranks, 2, small_config("fsdp", "sgd"))[0]
    assert result["seen"] == {"conv": torch.bfloat16, "bn": torch.float32}
    assert result["stored"] == {torch.float32}  # the sharded master parameters stay fp32
    assert all(math.isfinite(x) for x in result["losses"]), result["losses"]


def test_zero_overlaps_its_gradient_reduction_with_backward_on_gpus_only() -> None:
    """Every ZeRO stage on a GPU reduces buckets on their own stream during backward, on the reduction path
    whose only device-wide wait is the one per step (contiguous buckets, each all-reduced whole); on the CPU
    (gloo) DeepSpeed's default stays."""
    from swav_scale.engines.zero import deepspeed_config

    def zero(stage: int, on_gpu: bool) -> dict:
        return deepspeed_config(stage, 8, 2, 1000, on_gpu=on_gpu)["zero_optimization"]

    assert [zero(stage, True).get("overlap_comm") for stage in (1, 2, 3)] == [True, True, True]
    assert [zero(stage, False).get("overlap_comm") for stage in (1, 2, 3)] == [None, None, None]
    for stage in (1, 2, 3):
        for on_gpu in (True, False):
            pinned = zero(stage, on_gpu)
            assert pinned["contiguous_gradients"] and pinned["use_multi_rank_bucket_allreduce"]


def train_ranks_as_on_a_gpu(rank: int, world: int, overrides: list[str]) -> tuple[Trace, bool]:
    """`train_ranks` with the DeepSpeed config a GPU gets (overlap_comm), and whether DeepSpeed's optimizer
    took it: the gradients are then reduced bucket by bucket from backward's hooks, into two alternating
    buckets. The streams and the device waits are CUDA's; on the CPU DeepSpeed skips them and runs the rest
    of that path."""
    import deepspeed

    import swav_scale.engines.zero as zero

    as_built, initialize = zero.deepspeed_config, deepspeed.initialize
    optimizers = []

    def initialize_and_keep(*args: object, **kwargs: object) -> tuple:
        built = initialize(*args, **kwargs)
        optimizers.append(built[0].optimizer)
        return built

    zero.deepspeed_config = lambda *args, **kwargs: as_built(*args, **{**kwargs, "on_gpu": True})
    deepspeed.initialize = initialize_and_keep
    try:
        trace = train_ranks(rank, world, overrides)
    finally:
        zero.deepspeed_config, deepspeed.initialize = as_built, initialize
    return trace, bool(optimizers) and all(o.overlap_comm for o in optimizers)


@pytest.mark.parametrize(("stage", "optim"), [(1, "sgd"), (2, "adamw")])
def test_zero_1_and_2_with_the_gpus_overlapped_reduction_train_like_ddp(stage: int, optim: str) -> None:
    """ZeRO-1 reduces its gradients after backward unless overlap_comm is on, and ZeRO-2 on the compute
    stream: the overlapped path a GPU takes is a different reduction path, and it must train the same."""
    ddp = ddp_reference(optim)
    overrides = small_config("deepspeed", optim, **{"parallel.zero_stage": str(stage),
                                                    "parallel.zero_bucket_elements": "20000"})
    results = run_ranks(train_ranks_as_on_a_gpu, 2, overrides)
    assert [overlapped for _, overlapped in results] == [True, True]
    zero = [trace for trace, _ in results]
    for rank in range(2):
        assert_same(ddp[0].snapshots[-1], zero[rank].snapshots[-1], atol=1e-5)
        assert_same_grad_norms(ddp[0].grad_norms, zero[rank].grad_norms)
    assert_prototypes_frozen_then_trained(zero[0].snapshots)


def test_zero_computes_the_trunk_in_bf16_inside_a_forward_that_turns_autocast_off() -> None:
    """DeepSpeed wraps its module's forward in `torch.autocast(enabled=False)` on a GPU (an outer autocast
    and no `torch_autocast` config): the embedder enters the engine's autocast itself, so the trunk still
    computes in bf16. The head stays fp32 (swav_model.embed)."""
    from swav_scale.engines.zero import Embedder

    model = build_model(load_config(None, small_config("ddp", "sgd")))
    dtypes = []
    model.trunk.layer1.register_forward_hook(lambda module, args, out: dtypes.extend(o.dtype for o in out))
    embedder = Embedder(model.trunk, model.head, "cpu", torch.bfloat16)
    with torch.autocast("cpu", enabled=False):
        z = embedder(views_for(0, 0))
    assert dtypes and set(dtypes) == {torch.bfloat16} and z.dtype == torch.float32


def ddp_steps_warnings(rank: int, world: int, overrides: list[str]) -> list[str]:
    """The warnings a DDP engine and two steps raise on this rank, each recorded (not once per place)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_ranks(rank, world, overrides)
    return [str(w.message) for w in caught]


@pytest.mark.parametrize("channels_last", ["true", "false"])
def test_ddp_builds_and_steps_without_warnings_a_user_cannot_act_on(channels_last: str) -> None:
    """Neither DDP's "Grad strides do not match bucket view strides" (1x1 convolutions' gradients under
    channels-last inputs, build.build_model) nor a deprecation of the arguments the engine passes to DDP."""
    for messages in run_ranks(ddp_steps_warnings, 2, small_config("ddp", "sgd", **{"parallel.channels_last": channels_last})):
        assert not [m for m in messages if "Grad strides" in m or "deprecated" in m], messages
