"""The trunk's units under FSDP2 and torch.compile: with the trunk gathered in bf16 (the GPU policy, forced on
the CPU here) each stage is one FSDP unit and one compiled graph, BatchNorm stays whole in fp32 and trains as
under DDP, checkpoints still reshard; the ViT's blocks share one graph, with timm's drop-path semantics; and
SyncBatchNorm under compile is refused, naming the keys."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.distributed as dist
from timm.layers import DropPath
from torch import nn
from torch.distributed.tensor import DTensor

from swav_scale.build import build_model
from swav_scale.checkpoint.manager import Checkpointer
from swav_scale.checkpoint.states import TrainProgress
from swav_scale.config import ConfigError, OptimConfig, check_world, load_config
from swav_scale.distributed import DistEnv
from swav_scale.engines.assemble import build_engine, compile_units, use_sync_batchnorm
from swav_scale.engines.base import GradSquares
from swav_scale.engines.ddp import DDPEngine, OptimizerFactory
from swav_scale.engines.fsdp import FSDPEngine
from swav_scale.models import build_trunk
from swav_scale.models.vit import TensorDropPath
from swav_scale.optim import build_optimizer
from swav_scale.queue import FeatureQueue
from swav_scale.train import swav_step
from swav_testing.ranks import run_ranks

CPU = torch.device("cpu")
STEPS = 3
SIZES = (32, 32, 16)  # two global crops and a local one: two resolutions through each stage
# FSDP2's collectives by their torch.distributed names: torch 2.14's, then torch 2.11's
ALL_GATHERS = ("all_gather_single", "all_gather_into_tensor")
REDUCE_SCATTERS = ("reduce_scatter_single", "reduce_scatter_tensor")


def overrides(optim: str = "sgd", **extra: str) -> list[str]:
    """A small ResNet-18 (width 0.125, 8 to 64 channels) on 32 and 16 px crops: a few seconds a step on one core.
    32 px rather than 16: oneDNN's bf16 weight gradient of a 2x2 -> 1x1 convolution is sometimes garbage on
    CPU, whatever the engine."""
    values = {
        "data.train_shards": "unused", "model.arch": "resnet18", "model.width": "0.125", "model.small_stem": "true",
        "model.hidden_dims": "[32]", "model.embed_dim": "16", "model.num_prototypes": "12",
        "crops.sizes": "[32,16]", "crops.counts": "[2,1]", "swav.freeze_prototypes_iters": "1",
        "optim.batch_size": "8", "optim.name": optim, "optim.base_lr": "0.2", "parallel.precision": "bf16",
        "parallel.channels_last": "false", **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def views_for(rank: int, step: int, batch: int = 4) -> list[torch.Tensor]:
    """This rank's crops at `step`: different on every rank and step, the same for every engine."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(batch, 3, size, size, generator=g) for size in SIZES]


def foreach_optimizer(cfg: OptimConfig) -> OptimizerFactory:
    """build_optimizer's optimizer (groups, hyperparameters) with torch's foreach implementation, which torch
    picks by default for CUDA tensors only: one op over each group's list, the path that must take a list
    mixing DTensors and plain tensors (timm's Lars steps tensor by tensor either way)."""
    def make(params: Any) -> torch.optim.Optimizer:
        optimizer = build_optimizer(params, cfg)
        for group in optimizer.param_groups:
            if "foreach" in group:
                group["foreach"] = True
        return optimizer
    return make


def fsdp_bf16(rank: int, world: int, cfg_overrides: list[str], compile_backend: str | None = None) -> FSDPEngine:
    """FSDPEngine with the trunk gathered in bf16, under bf16 autocast: the GPU configuration, on the CPU."""
    cfg = load_config(None, cfg_overrides)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    if compile_backend is not None:
        compile_units(model.trunk, backend=compile_backend)
    return FSDPEngine(model, foreach_optimizer(cfg.optim), DistEnv(rank, world, rank, world, CPU), "bf16",
                      bf16_params=True)


@contextmanager
def counting(names: tuple[str, ...], calls: list[str]) -> Iterator[None]:
    """Append to `calls` the name of each torch.distributed function of `names` (those that exist) called."""
    originals = {n: getattr(dist, n) for n in names if hasattr(dist, n)}

    def counted(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        return lambda *args, **kwargs: calls.append(name) or fn(*args, **kwargs)

    for name, fn in originals.items():
        setattr(dist, name, counted(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def graph_counts() -> tuple[int, int]:
    """(graphs dynamo has compiled, graph breaks) in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


# ---- FSDP2: one unit and one graph per stage with the trunk in bf16


def collectives_and_graphs(rank: int, world: int) -> dict[str, Any]:
    """A step to initialise (FSDP's lazy init, the first compile), then a counted one: the collectives of the
    whole step, the all-reduces of backward alone, and the graphs and graph breaks after each step."""
    engine = fsdp_bf16(rank, world, overrides(), compile_backend="aot_eager")
    cfg = load_config(None, overrides())
    queue = FeatureQueue(2, 8, cfg.model.embed_dim)
    swav_step(engine, views_for(rank, 0), cfg.swav, 0, 0.1, queue)
    after_first = graph_counts()
    backward, in_backward = engine.backward, []

    def counted_backward(loss: torch.Tensor) -> None:
        with counting(("all_reduce",), in_backward):
            backward(loss)

    engine.backward = counted_backward  # type: ignore[method-assign]
    step_calls: list[str] = []
    with counting(ALL_GATHERS + REDUCE_SCATTERS, step_calls):
        swav_step(engine, views_for(rank, 1), cfg.swav, 1, 0.1, queue, measure_grad_norm=True)
    return {"gathers": sum(c in ALL_GATHERS for c in step_calls),
            "reduce_scatters": sum(c in REDUCE_SCATTERS for c in step_calls),
            "backward_all_reduces": len(in_backward), "graphs": [after_first, graph_counts()]}


def test_bf16_trunk_is_one_fsdp_unit_and_one_compiled_graph_per_stage() -> None:
    """With the trunk gathered in bf16 and BatchNorm kept in fp32, a step gathers each of the 4 stages once in
    forward and once in backward and the root unit once (9 all-gathers; BatchNorm with units of its own took
    85 in this network), reduce-scatters each unit once (5, not 24), and averages the replicated BatchNorm
    gradients in one all-reduce. Compiled (aot_eager: inductor's tracing of forward and backward, without
    its code generation), each stage is one graph without a break (36 graphs, 28 breaks with a unit per
    BatchNorm), and the second step compiles nothing new."""
    for result in run_ranks(collectives_and_graphs, 2):
        assert (result["gathers"], result["reduce_scatters"], result["backward_all_reduces"]) == (2 * 4 + 1, 4 + 1, 1)
        assert result["graphs"] == [(4, 0), (4, 0)]


# ---- FSDP2 with replicated BatchNorm trains as DDP does


def is_trunk_norm(name: str) -> bool:
    """A BatchNorm parameter of a trunk stage (torchvision's names: bn1..bn3, downsample.1)."""
    return name.startswith("trunk.layer") and (".bn" in name or ".downsample.1." in name)


def traces(rank: int, world: int, engine_name: str) -> dict[str, dict[str, Any]]:
    """For each optimizer: the whole gradients every step sees before its update, the gradient norms, the
    parameters at the end, and which parameters are plain tensors (not sharded)."""
    results = {}
    for optim in ("sgd", "adamw", "lars"):
        cfg = load_config(None, overrides(optim))
        if engine_name == "ddp":
            torch.manual_seed(cfg.train.seed)
            engine = DDPEngine(build_model(cfg), foreach_optimizer(cfg.optim), DistEnv(rank, world, rank, world, CPU),
                               "bf16")
        else:
            engine = fsdp_bf16(rank, world, overrides(optim))
        grads: list[dict[str, torch.Tensor]] = []
        step = engine.step

        def recorded_step(measure_grad_norm: bool = False) -> GradSquares | None:
            grads.append({n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
                          for n, p in engine.model.named_parameters() if p.grad is not None})
            return step(measure_grad_norm)

        engine.step = recorded_step  # type: ignore[method-assign]
        queue = FeatureQueue(2, 8, cfg.model.embed_dim)
        norms = [swav_step(engine, views_for(rank, s), cfg.swav, s, cfg.optim.base_lr, queue,
                           True).grad_squares.norm() for s in range(STEPS)]
        results[optim] = {"grads": grads, "norms": norms, "params": engine.full_parameters(),
                          "plain": sorted(n for n, p in engine.model.named_parameters() if not isinstance(p, DTensor))}
    return results


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_replicated_batchnorm_trains_like_ddp_with_foreach_sgd_adamw_and_lars() -> None:
    """Trunk in bf16 under FSDP, BatchNorm whole and fp32 on every rank, foreach optimizers over groups mixing
    DTensors and plain tensors: every gradient the optimizer sees (BatchNorm's averaged by the engine), the
    gradient norms and the parameters after 3 steps are DDP's under the same bf16 autocast (the same bf16
    arithmetic; reductions summed in another order), and BatchNorm stays identical on both ranks."""
    ddp, fsdp = run_ranks(traces, 2, "ddp"), run_ranks(traces, 2, "fsdp")
    for optim in ("sgd", "adamw", "lars"):
        reference = ddp[0][optim]
        assert reference["plain"] == sorted(reference["params"])  # DDP: nothing sharded
        for rank in range(2):
            ours = fsdp[rank][optim]
            assert ours["plain"] == sorted(n for n in ours["params"] if is_trunk_norm(n)) != []
            for step in range(STEPS):
                assert largest_difference(reference["grads"][step], ours["grads"][step]) <= 1e-6, (optim, step)
            assert ours["norms"] == pytest.approx(reference["norms"], rel=1e-5)
            assert largest_difference(reference["params"], ours["params"]) <= 1e-5, optim
        first, second = (fsdp[rank][optim]["params"] for rank in range(2))
        assert all(torch.equal(first[n], second[n]) for n in fsdp[0][optim]["plain"])


# ---- checkpoints with replicated BatchNorm


def save_bf16(rank: int, world: int, root: str) -> dict[str, dict[str, torch.Tensor]]:
    engine = fsdp_bf16(rank, world, overrides("adamw"))
    cfg = load_config(None, overrides("adamw"))
    for step in range(STEPS):
        swav_step(engine, views_for(0, step), cfg.swav, step, cfg.optim.base_lr, None)
    Checkpointer(root, DistEnv(rank, world, rank, world, CPU)).save(STEPS, {"engine": engine,
                                                                            "progress": TrainProgress()}, {})
    saved = engine.full_parameters()
    swav_step(engine, views_for(0, STEPS), cfg.swav, STEPS, cfg.optim.base_lr, None)
    return {"saved": saved, "next": engine.full_parameters()}


def resume_bf16(rank: int, world: int, root: str) -> dict[str, Any]:
    engine = fsdp_bf16(rank, world, overrides("adamw"))
    cfg = load_config(None, overrides("adamw"))
    checkpointer = Checkpointer(root, DistEnv(rank, world, rank, world, CPU))
    checkpointer.load(checkpointer.latest(), {"engine": engine, "progress": TrainProgress()}, {})
    resumed = engine.full_parameters()
    swav_step(engine, views_for(0, STEPS), cfg.swav, STEPS, cfg.optim.base_lr, None)
    return {"resumed": resumed, "next": engine.full_parameters(),
            "sharded": isinstance(engine.model.trunk.layer1[0].conv1.weight, DTensor)}


def test_checkpoint_with_replicated_batchnorm_saved_on_2_ranks_resumes_on_1(tmp_path: Path) -> None:
    """DCP saves and reloads a model and AdamW state mixing DTensors and plain tensors (DCP initialises the
    fresh optimizer's state by a step of its own, through the mixed foreach path), and reshards them onto one
    rank, which still shards (a one-rank group): its step after resuming is the 2-rank run's (every rank
    trains on the same views here; AdamW's step equals it only with the moments carried over)."""
    saved = run_ranks(save_bf16, 2, str(tmp_path))[0]
    resumed = run_ranks(resume_bf16, 1, str(tmp_path))[0]
    assert resumed["sharded"]
    assert largest_difference(saved["saved"], resumed["resumed"]) == 0.0
    assert largest_difference(saved["next"], resumed["next"]) <= 1e-5
    assert largest_difference(saved["next"], saved["saved"]) > 0.1  # the step moves the parameters


def test_a_lone_process_without_a_group_runs_the_plain_model() -> None:
    cfg = load_config(None, overrides(**{"parallel.engine": "fsdp"}))
    engine = build_engine(cfg, build_model(cfg), DistEnv(0, 1, 0, 1, CPU))
    assert not any(isinstance(p, DTensor) for p in engine.model.parameters())


# ---- the ViT: one graph for all blocks, timm's drop path


@pytest.fixture
def fresh_dynamo(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Dynamo's caches and counters empty, and its recompile limit restored afterwards."""
    from torch._dynamo import config
    from torch._dynamo.utils import counters

    monkeypatch.setattr(config, "recompile_limit", config.recompile_limit)
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_compiled_vit_blocks_share_one_graph_and_do_not_recompile(fresh_dynamo: None) -> None:
    """ViT-S/16 with stochastic depth (a drop probability rising block by block) in training: the 12 compiled
    blocks share one graph (12 when each block's probability was a Python float that dynamo guards on), which
    a second step reuses; the recompile limit is compile_units' own whatever an import set."""
    import timm.optim  # noqa: F401  # sets dynamo's recompile limit to a million

    from torch._dynamo import config

    torch.manual_seed(0)
    trunk = build_trunk("vit_small").train()
    compile_units(trunk, backend="aot_eager")
    assert config.recompile_limit == 8 * 12
    seen = []
    for _ in range(2):
        features = trunk([torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)])
        sum(f.sum() for f in features).backward()
        seen.append(graph_counts())
    assert seen == [(1, 0), (1, 0)]


def test_drop_path_probabilities_and_keys_are_timms() -> None:
    """Every block has a TensorDropPath at timm's probability (0 at the first block, where timm has an
    Identity), and the state_dict has timm's keys only; without stochastic depth the blocks keep timm's
    Identities."""
    with torch.device("meta"):
        ours = build_trunk("vit_small", drop_path_rate=0.2)
        reference = timm.create_model("vit_small_patch16_224", num_classes=0, drop_path_rate=0.2)
        plain = build_trunk("vit_small", drop_path_rate=0.0)
    for block, timm_block in zip(ours.blocks, reference.blocks, strict=True):
        for name in ("drop_path1", "drop_path2"):
            theirs = getattr(timm_block, name)
            assert isinstance(getattr(block, name), TensorDropPath)
            assert getattr(block, name).drop_prob == (theirs.drop_prob if isinstance(theirs, DropPath) else 0.0)
    assert list(ours.state_dict()) == list(reference.state_dict())
    assert all(isinstance(getattr(b, n), nn.Identity) for b in plain.blocks for n in ("drop_path1", "drop_path2"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensor_drop_path_drops_and_scales_samples_as_timm(dtype: torch.dtype) -> None:
    """In training each sample is either dropped (zeros) or kept and scaled exactly as timm's DropPath
    computes it (x * (1 / keep) in x's dtype), kept with probability 1 - p; probability 0 keeps every sample
    unchanged, probability 1 drops all (no 0/0); in eval the input comes back untouched."""
    torch.manual_seed(0)
    x = torch.randn(4000, 3, 5).to(dtype)
    drop = TensorDropPath(0.25).train()
    out = drop(x)
    timm_kept = x * x.new_ones(4000, 1, 1).div_(0.75)  # timm's arithmetic for a kept sample
    kept = (out == timm_kept).flatten(1).all(dim=1)
    dropped = (out == 0).flatten(1).all(dim=1)
    assert out.dtype == dtype and bool((kept | dropped).all()) and not bool((kept & dropped).any())
    assert kept.float().mean().item() == pytest.approx(0.75, abs=5 * (0.75 * 0.25 / 4000) ** 0.5)
    assert torch.equal(TensorDropPath(0.0).train()(x), x)
    assert torch.equal(TensorDropPath(1.0).train()(x), torch.zeros_like(x))
    assert drop.eval()(x) is x


# ---- SyncBatchNorm under compile


def test_compile_with_sync_batchnorm_on_several_ranks_is_refused_naming_both_keys() -> None:
    """SyncBatchNorm is used with ranks to synchronise with, on any device, and refused under parallel.compile
    with a message naming both keys and what to set; build_engine decides so before it touches the device."""
    def parallel_config(compile_: bool, sync: bool) -> Any:
        return load_config(None, overrides(**{"parallel.compile": str(compile_).lower(),
                                              "parallel.sync_batchnorm": str(sync).lower()})).parallel

    assert use_sync_batchnorm(parallel_config(False, True), 2)
    assert not use_sync_batchnorm(parallel_config(False, True), 1)
    assert not use_sync_batchnorm(parallel_config(True, False), 2)
    message = (r"parallel\.compile=true with parallel\.sync_batchnorm=true on 2 ranks.*Set parallel\.compile=false"
               r".*or parallel\.sync_batchnorm=false")
    compiled = load_config(None, overrides(**{"parallel.compile": "true"}))
    check_world(compiled, 1)  # one rank: nothing to synchronise
    with pytest.raises(ConfigError, match=message):
        check_world(compiled, 2)
    with pytest.raises(ConfigError, match=message):
        build_engine(compiled, build_model(compiled), DistEnv(0, 2, 0, 2, torch.device("cuda", 0)))
