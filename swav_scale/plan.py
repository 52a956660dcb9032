"""`swav-scale plan`: whether a config fits on the GPUs of a job, per rank, before the job waits in a queue.

Every figure comes from the code that trains, not from a table of models:

* the parameters' sizes from the real model (`build.build_model`), built on the `meta` device: no weight is
  allocated, so a 1.3B-parameter RegNetY-256GF plans in seconds;
* the activations of one training step from that model run forward and backward under torch's FakeTensorMode
  (tensors with shapes, dtypes and storages but no memory) at one rank's batch and crops, under the autocast the
  GPU would run, with the activation checkpointing the config asks for. `LiveBytes` counts the bytes of every
  storage an operation creates, once, until Python frees it: the live bytes after each operation, and the peak;
* the optimizer's state and the temporaries of its step from the real optimizer (`optim.build_optimizer`)
  stepped once on fake gradients, in the foreach form torch picks on a GPU;
* what each engine stores beside them (replicas, shards, flat buffers, buckets, gathered units) and what it
  sends, from the engines' layouts (engines/ddp.py, fsdp.py, zero.py) in closed form: `engine_memory`,
  `communication`.

docs/plan.md says how each line is computed, what is left out, and how the plan compares with the measured
peak of a CPU process (benchmarks/bench_plan_memory.py).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from swav_scale.build import build_model
from swav_scale.config import Config, ConfigError, EngineKind, Optimizer, Precision, check_world, rank_batch
from swav_scale.engines.activation_checkpointing import apply_activation_checkpointing
from swav_scale.engines.assemble import group_size
from swav_scale.engines.fsdp import replicated_norms, shard_units
from swav_scale.optim import build_optimizer
from swav_scale.swav import assign_codes, swapped_prediction_loss

GiB = 2**30
MiB = 2**20

# The fixed part of every GPU's memory that no tensor of the step accounts for (`Reserve`). CUDA context: the
# driver's and torch's kernels loaded on the device, cuBLAS's and cuDNN's workspaces (torch reports 0.5-1 GiB
# used on an H100 before the first tensor, with CUDA's lazy module loading). NCCL: its communicators' buffers,
# NCCL_BUFFSIZE (4 MiB) per channel and peer for the world group, the shard and replica groups and the
# SyncBatchNorm groups, plus its proxy and work FIFOs: about 1 GiB at the scales planned here.
CUDA_CONTEXT_BYTES = 1 * GiB
NCCL_BYTES = 1 * GiB
# The caching allocator rounds every block up (512 B; 2 MiB segments for small blocks, 20 MiB for mid-sized
# ones) and cannot always reuse a freed block for a larger request: in steady training the reserved memory
# exceeds the allocated peak by some 5-15%. The plan adds 10% of the tensors' peak.
FRAGMENTATION = 0.10

# DeepSpeed ZeRO-3's threshold below which a parameter is not partitioned but kept whole on every rank
# (stage3_param_persistence_threshold, DeepSpeed's default; engines/zero.py's config leaves it).
ZERO3_PERSISTENCE_THRESHOLD = 100_000


# ---- counting live bytes


class LiveBytes(TorchDispatchMode):
    """The bytes of the storages alive, counted at each operation: every storage an operation returns is
    counted once when it appears and uncounted when Python frees it (a weakref finalizer on the storage, whose
    Python object torch keeps while the storage lives). In-place operations and views return storages already
    counted. Under FakeTensorMode nothing is allocated: the counts are what the operations would allocate.

    `timeline` holds, after each operation, (live bytes, gradient elements accumulated so far): the engines
    keep the parameters' gradients differently (whole, sharded, in buckets), so the gradients are taken out of
    the count as autograd accumulates them (`drop_gradients`) and each engine adds its own back (`Activations`).
    Sizes are rounded up to the CUDA caching allocator's 512 bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.grad_elements = 0
        self.timeline: list[tuple[int, int]] = []
        self._counted: set[int] = set()
        self._existing: list[Any] = []  # storages allocated before the count, held so that their ids stay theirs
        self._ignored: set[int] = set()

    def ignore(self, tensors: Iterable[Tensor]) -> None:
        """Leave out of the count the storages of `tensors`, allocated before it (parameters, buffers, inputs):
        an in-place operation on them, or a view of them (a weight's transpose), returns their storage."""
        for t in tensors:
            storage = t.untyped_storage()
            self._existing.append(storage)
            self._ignored.add(id(storage))

    def _forget(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._counted.discard(key)

    def count(self, tensor: Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._counted or key in self._ignored:
            return
        nbytes = -(-storage.nbytes() // 512) * 512
        self._counted.add(key)
        self.live += nbytes
        weakref.finalize(storage, self._forget, key, nbytes)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self.count(t)
        self.peak = max(self.peak, self.live)
        self.timeline.append((self.live, self.grad_elements))
        return out


@contextmanager
def drop_gradients(model: nn.Module, tracker: LiveBytes) -> Iterator[None]:
    """Count each parameter's gradient as accumulated (tracker.grad_elements) and drop it at once, so that the
    live bytes are the activations and the step's temporaries alone."""
    def done(p: Tensor) -> None:
        tracker.grad_elements += p.numel()
        p.grad = None

    handles = [p.register_post_accumulate_grad_hook(done) for p in model.parameters() if p.requires_grad]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def fake_mode() -> Any:
    from torch._subclasses.fake_tensor import FakeTensorMode  # private module: imported where it is used

    return FakeTensorMode(allow_non_fake_inputs=True)


# ---- the model's sizes


@dataclass(frozen=True)
class ModelSizes:
    """Parameter counts (elements) of the parts the engines treat apart."""

    total: int
    prototypes: int  # replicated under ZeRO (engines/zero.py)
    units: list[int]  # the trunk's FSDP units (fsdp.shard_units), each gathered whole
    unit_norms: int  # the units' BatchNorm parameters, whole on every rank when FSDP gathers in bf16
    root: int  # FSDP's root unit: stem, head and prototypes, gathered in fp32 from forward to backward's end
    largest_module: int  # the largest module's own parameters (ZeRO-3 gathers module by module)
    small: int  # parameters under ZeRO-3's persistence threshold, kept whole
    tensors: int  # parameter tensors (LARS under FSDP reduces two norms of each)

    @classmethod
    def of(cls, model: nn.Module, unit: str = "stage") -> ModelSizes:
        units = shard_units(model.trunk, unit)
        unit_sizes = [sum(p.numel() for p in u.parameters()) for u in units]
        norms = sum(p.numel() for u in units for p in replicated_norms(u))
        params = list(model.parameters())
        total = sum(p.numel() for p in params)
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        return cls(total=total, prototypes=model.prototypes.weight.numel(), units=unit_sizes, unit_norms=norms,
                   root=total - sum(unit_sizes), largest_module=largest,
                   small=sum(p.numel() for p in params if p.numel() < ZERO3_PERSISTENCE_THRESHOLD),
                   tensors=len(params))


# ---- what one rank runs, measured on fake tensors


@dataclass(frozen=True)
class Target:
    """Where the plan's rank runs. `gpu`: a CUDA device, in a process group (as every GPU run is, one rank too),
    precision `auto` meaning bf16 (GPUs from Ampere on). Not `gpu`: a CPU process, as the CPU validation runs,
    with no process group at one rank (the plain model: engines/ddp.py, fsdp.py) and no reserve."""

    gpu: bool = True


def autocast_dtype(cfg: Config, target: Target) -> torch.dtype | None:
    """engines.base.autocast_dtype for the planned device: auto is bf16 on GPUs from Ampere on; on a CPU the
    plan reads auto as fp32 (a CPU's bf16 depends on its instruction set)."""
    p = cfg.parallel.precision
    if p == Precision.bf16 or (p == Precision.auto and target.gpu):
        return torch.bfloat16
    return None


@dataclass(frozen=True)
class StepShape:
    """What the activations depend on: the model, one rank's batch and crops, the autocast dtype, whether the
    trunk's units hold bf16 parameters (FSDP's bf16 gathers) and the activation checkpointing."""

    batch: int
    dtype: torch.dtype | None
    bf16_units: bool
    checkpointing: str
    queue_rows: int  # this rank's queued embeddings per assigned crop, scored beside the batch in Sinkhorn

    def key(self, cfg: Config) -> str:
        return repr((OmegaConf.to_yaml(OmegaConf.structured(cfg.model)), cfg.crops.sizes, cfg.crops.counts,
                     cfg.swav.crops_for_assign, cfg.parallel.channels_last, self))


@dataclass(frozen=True)
class Activations:
    """One forward and backward pass of a rank, measured on fake tensors.

    `timeline` is (live bytes, gradient elements accumulated so far) after each operation, without the
    parameters' gradients (LiveBytes); `inputs` the crops' bytes, alive throughout; `batchnorm_channels` the
    channels of every BatchNorm call, recomputations included (SyncBatchNorm's statistics, one all-reduce each),
    `batchnorm_backward_channels` those of the forward's calls alone (one all-reduce each in backward: a
    recomputed call's backward is the backward of its call)."""

    peak: int
    timeline: list[tuple[int, int]]
    inputs: int
    batchnorm_channels: list[int]
    batchnorm_backward_channels: list[int]

    def peak_with_gradients(self, bytes_per_element: float) -> int:
        """The peak of activations plus the gradients an engine keeps, `bytes_per_element` of each parameter's
        gradient once accumulated (4: whole fp32 gradients; 4 / N: an fp32 shard)."""
        return max(int(live + bytes_per_element * done) for live, done in self.timeline)


def crops(cfg: Config, batch: int) -> list[Tensor]:
    """One rank's views as the loop gives them (data.device.device_views): fp32, channels-last if configured."""
    layout = torch.channels_last if cfg.parallel.channels_last else torch.contiguous_format
    return [torch.empty(batch, 3, s, s).contiguous(memory_format=layout)
            for s, n in zip(cfg.crops.sizes, cfg.crops.counts) for _ in range(n)]


def cast_units_to_bf16(model: nn.Module) -> None:
    """The trunk's units as FSDP2 gathers them in bf16 (fsdp.parallelize): every parameter in bf16 but the
    BatchNorm ones, which stay fp32 (fsdp.replicated_norms)."""
    for unit in shard_units(model.trunk):
        keep = replicated_norms(unit)
        for p in unit.parameters():
            if p not in keep:
                p.data = p.data.to(torch.bfloat16)


def meta_model(cfg: Config) -> nn.Module:
    """The config's SwAV model on the meta device: its modules and shapes, no weight allocated."""
    with torch.device("meta"):
        return build_model(cfg)


def measure_step(cfg: Config, shape: StepShape) -> Activations:
    """Forward, Sinkhorn, loss and backward of one rank's step (train.swav_step's order) on fake tensors."""
    model = meta_model(cfg)
    channels: list[int] = []
    forward_calls = 0

    def note(module: nn.Module, args: Any) -> None:
        channels.append(module.num_features)

    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.register_forward_pre_hook(note)
    apply_activation_checkpointing(model.trunk, shape.checkpointing)  # as build_engine applies it
    with fake_mode():
        model.to_empty(device="cpu")
        if shape.bf16_units:
            cast_units_to_bf16(model)
        views = crops(cfg, shape.batch)
        k = cfg.model.num_prototypes
        queue = ([torch.empty(shape.queue_rows, k) for _ in cfg.swav.crops_for_assign] if shape.queue_rows
                 else None)
        inputs = sum(v.untyped_storage().nbytes() for v in views)
        tracker = LiveBytes()
        tracker.ignore([*model.parameters(), *model.buffers(), *views, *(queue or [])])
        with tracker, drop_gradients(model, tracker):
            with torch.autocast("cpu", dtype=shape.dtype or torch.float32, enabled=shape.dtype is not None):
                z, scores = model(views)
            forward_calls = len(channels)  # the rest are recomputations, in backward
            codes = assign_codes(scores, cfg.swav.crops_for_assign, cfg.swav.epsilon, cfg.swav.sinkhorn_iterations,
                                 queue)
            loss = swapped_prediction_loss(scores, codes, cfg.swav.temperature)
            loss.backward()
            del z, scores, codes, loss
    return Activations(tracker.peak, tracker.timeline, inputs, channels, channels[:forward_calls])


@dataclass(frozen=True)
class OptimizerStep:
    """The optimizer's state and its step's temporaries, per parameter element (bytes), measured by stepping
    `optim.name`'s optimizer once over fake parameters and gradients: those of the projection head and the
    prototypes, matrices and vectors both (each parameter group), whose per-element bytes are the whole
    model's under the foreach step."""

    state_per_element: float
    temporaries_per_element: float
    state_copies: float  # the state in fp32 copies of the parameters (LARS, SGD: 1; AdamW: 2)


def measure_optimizer(cfg: Config, foreach: bool = True) -> OptimizerStep:
    """torch's SGD and AdamW and timm's LARS step in their foreach form on a GPU (one kernel over all tensors,
    temporaries the size of all of them), measured on the head's and prototypes' parameters: matrices and
    vectors both (each parameter group), whose per-element bytes are the whole model's under a foreach step.
    On a CPU they step tensor by tensor (torch picks foreach for CUDA tensors only), whose temporaries follow
    the largest tensor: measured over the whole model. The state is what the first step leaves behind; the
    temporaries, what the step holds above that at its peak."""
    model = meta_model(cfg)
    with fake_mode():
        model.to_empty(device="cpu")
        params = [*model.head.parameters(), *model.prototypes.parameters()] if foreach else list(model.parameters())
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer = build_optimizer(params, cfg.optim)
        for group in optimizer.param_groups:
            if "foreach" in group:
                group["foreach"] = foreach
        tracker = LiveBytes()
        tracker.ignore([*params, *(p.grad for p in params)])
        with tracker:
            optimizer.step()
        state = tracker.live
        temporaries = tracker.peak - tracker.live
    elements = sum(p.numel() for p in params)
    return OptimizerStep(state / elements, temporaries / elements, round(state / (4 * elements), 2))


class Measurements:
    """Measured steps, each once per shape: the suggestions plan variants of one config, most of which share
    their activations (an engine's variants), and a model's optimizer step is the same for all of them."""

    def __init__(self) -> None:
        self._steps: dict[str, Activations] = {}
        self._optimizers: dict[str, OptimizerStep] = {}
        self._sizes: dict[str, ModelSizes] = {}

    def sizes(self, cfg: Config) -> ModelSizes:
        key = OmegaConf.to_yaml(OmegaConf.structured(cfg.model)) + cfg.parallel.fsdp_unit
        if key not in self._sizes:
            self._sizes[key] = ModelSizes.of(meta_model(cfg), cfg.parallel.fsdp_unit)
        return self._sizes[key]

    def step(self, cfg: Config, shape: StepShape) -> Activations:
        key = shape.key(cfg)
        if key not in self._steps:
            self._steps[key] = measure_step(cfg, shape)
        return self._steps[key]

    def optimizer(self, cfg: Config, foreach: bool) -> OptimizerStep:
        key = repr((OmegaConf.to_yaml(OmegaConf.structured(cfg.model)), cfg.optim.name,
                    cfg.optim.exclude_bias_and_norm, foreach))
        if key not in self._optimizers:
            self._optimizers[key] = measure_optimizer(cfg, foreach)
        return self._optimizers[key]


# ---- the job


@dataclass(frozen=True)
class Cluster:
    """The job: nodes x GPUs per node, one rank per GPU, each GPU with `gpu_memory_gib` GiB (2^30 bytes)."""

    nodes: int
    gpus_per_node: int
    gpu_memory_gib: float

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def check(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ConfigError(f"--nodes {self.nodes} --gpus-per-node {self.gpus_per_node}: a job has at least one "
                              "node of one GPU")
        if not self.gpu_memory_gib > 0:
            raise ConfigError(f"--gpu-memory {self.gpu_memory_gib}: give each GPU's memory in GiB (80 for an "
                              "H100 80GB)")


# ---- per-rank memory


@dataclass
class Line:
    """One line of the per-rank memory: what, how many bytes, and how it was computed."""

    name: str
    bytes: int
    how: str


@dataclass
class Memory:
    """A rank's memory: what stays through the step (`resident`), the forward/backward peak above it
    (`forward_backward`: activations with the engine's gradients, gathers and buckets), the optimizer step's
    peak above it (`optimizer_step`: the gradients then kept and the step's temporaries), and the reserve."""

    resident: list[Line]
    forward_backward: list[Line]
    optimizer_step: list[Line]
    reserve: list[Line]

    @staticmethod
    def total(lines: list[Line]) -> int:
        return sum(line.bytes for line in lines)

    @property
    def tensors_peak(self) -> int:
        return self.total(self.resident) + max(self.total(self.forward_backward), self.total(self.optimizer_step))

    @property
    def peak(self) -> int:
        return self.tensors_peak + self.total(self.reserve)

    @property
    def peak_phase(self) -> str:
        return ("forward/backward" if self.total(self.forward_backward) >= self.total(self.optimizer_step)
                else "optimizer step")


@dataclass(frozen=True)
class Layout:
    """How the engine spreads the model over this job's ranks."""

    engine: str  # ddp | fsdp | zero1 | zero2 | zero3
    world: int
    shard: int  # ranks a parameter's shards span (1: replicated)
    replicas: int  # copies of each shard (HSDP's replica groups)
    wrapped: bool  # in a process group (DDP's buckets, FSDP's shards): always on a GPU
    bf16_units: bool  # FSDP gathers the trunk's units in bf16

    @property
    def name(self) -> str:
        if self.engine == "fsdp" and self.replicas > 1:
            return f"fsdp (HSDP: shards over {self.shard} ranks, {self.replicas} replicas)"
        return {"fsdp": f"fsdp (shards over {self.shard} ranks)"}.get(self.engine, self.engine)


def layout(cfg: Config, world: int, local_world: int, target: Target) -> Layout:
    p = cfg.parallel
    wrapped = target.gpu or world > 1
    if p.engine == EngineKind.ddp:
        return Layout("ddp", world, 1, world, wrapped, False)
    if p.engine == EngineKind.fsdp:
        if not wrapped:
            return Layout("fsdp", world, 1, 1, False, False)
        shard = group_size(p.fsdp_shard_group, world, local_world) or world
        bf16 = target.gpu and autocast_dtype(cfg, target) == torch.bfloat16
        return Layout("fsdp", world, shard, world // shard, True, bf16)
    return Layout(f"zero{p.zero_stage}", world, world, 1, True, False)


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def engine_memory(cfg: Config, lay: Layout, sizes: ModelSizes, acts: Activations, opt: OptimizerStep,
                  target: Target) -> Memory:
    """A rank's memory under the engine's layout (module docstring; docs/plan.md, line by line)."""
    P, n = sizes.total, lay.shard
    k = opt.state_per_element  # bytes of optimizer state per parameter element
    t = opt.temporaries_per_element
    resident: list[Line] = [Line("input crops", acts.inputs, "one rank's views, fp32 (measured)")]
    queue_rows = queue_rows_of(cfg, lay.world)
    if queue_rows:
        q = len(cfg.swav.crops_for_assign) * queue_rows * cfg.model.embed_dim * 4
        resident.append(Line("feature queue", q, f"{queue_rows} fp32 embeddings per assigned crop"))
    fb: list[Line] = []
    st: list[Line] = []
    gathered_dtype = 2 if lay.bf16_units else 4
    if lay.engine == "ddp":
        resident += [Line("parameters", 4 * P, "whole, fp32"),
                     Line("optimizer state", int(k * P), f"whole, {opt.state_copies:g} fp32 copies")]
        if lay.wrapped:  # the gradients are views of the reducer's buckets (engines/ddp.py)
            resident.append(Line("gradients in DDP's buckets", 4 * P, "whole, fp32: the reducer's flat buckets, "
                                 "which the gradients are views of"))
            fb.append(Line("activations", acts.peak_with_gradients(0),
                           "measured peak of the pass; each gradient copied into its bucket as it is computed"))
            st.append(Line("step temporaries", int(t * P), "measured"))
        else:  # a lone CPU process: the plain model's own gradients
            fb.append(Line("activations + gradients", acts.peak_with_gradients(4),
                           "measured peak of the pass, fp32 gradients kept as accumulated"))
            st += [Line("gradients", 4 * P, "whole, fp32"), Line("step temporaries", int(t * P), "measured")]
    elif lay.engine == "fsdp":
        if not lay.wrapped:  # a lone CPU process trains the plain model
            resident += [Line("parameters", 4 * P, "whole, fp32 (one process: no sharding)"),
                         Line("optimizer state", int(k * P), f"whole, {opt.state_copies:g} fp32 copies")]
            fb.append(Line("activations + gradients", acts.peak_with_gradients(4), "measured peak of the pass"))
            st += [Line("gradients", 4 * P, "whole, fp32"), Line("step temporaries", int(t * P), "measured")]
        else:
            norms = sizes.unit_norms if lay.bf16_units else 0
            sharded = P - norms
            resident += [Line("parameter shards", 4 * sharded // n + 4 * norms,
                              f"fp32, 1/{n} of each" + (", units' BatchNorm whole" if norms else "")),
                         Line("optimizer state", int(k * (sharded / n + norms)),
                              f"on the shards, {opt.state_copies:g} fp32 copies")]
            unit = max(sizes.units)
            pair = max(a + b for a, b in zip(sizes.units, sizes.units[1:])) if len(sizes.units) > 1 else unit
            if cfg.parallel.fsdp_reshard_after_forward:
                gathered = Line("gathered units", pair * gathered_dtype + 4 * sizes.root,
                                f"the largest two neighbouring trunk units (one prefetched), "
                                f"{'bf16' if lay.bf16_units else 'fp32'}; the root unit (stem, head, prototypes) "
                                "fp32")
            else:
                gathered = Line("gathered units", sum(sizes.units) * gathered_dtype + 4 * sizes.root,
                                "every trunk unit from its forward to its backward "
                                "(fsdp_reshard_after_forward=false) and the root unit")
            fb += [Line("activations + gradient shards", acts.peak_with_gradients(4 / n),
                        "measured peak of the pass, fp32 gradient shards kept"),
                   gathered,
                   Line("unit gradient, unsharded", unit * (gathered_dtype + 4),
                        "the largest unit's gradient before its reduce-scatter, and its fp32 copy")]
            st += [Line("gradient shards", 4 * sharded // n + 4 * norms, "fp32"),
                   Line("step temporaries", int(t * (sharded / n + norms)), "measured, on the shards")]
    else:
        stage = int(lay.engine[-1])
        Pz, Pp = P - sizes.prototypes, sizes.prototypes
        bucket = min(cfg.parallel.zero_bucket_elements, Pz) * 4
        buckets = 2 if target.gpu else 1  # overlap_comm on a GPU: two buckets in flight (zero.deepspeed_config)
        proto = Line("prototypes (replicated)", int(4 * Pp + k * Pp), "whole on every rank with their optimizer "
                     "state")
        if stage in (1, 2):
            resident += [Line("parameters", 4 * Pz, "the whole model in the flat 'bit16' buffer (fp32 here)"),
                         Line("fp32 master partition", 4 * Pz // n, f"1/{n}"),
                         Line("optimizer state", int(k * Pz / n), f"on the partition, {opt.state_copies:g} copies"),
                         proto]
        else:
            persistent = sizes.small
            resident += [Line("parameter partition", 4 * (Pz - persistent) // n + 4 * persistent,
                              f"1/{n}, the master sharing it; parameters under "
                              f"{ZERO3_PERSISTENCE_THRESHOLD:,} elements whole"),
                         Line("optimizer state", int(k * Pz / n), f"on the partition, {opt.state_copies:g} copies"),
                         proto]
            fb.append(Line("gathered parameters", 4 * (sizes.largest_module + cfg.parallel.zero_bucket_elements),
                           "the largest module and a prefetch bucket, fp32"))
        if stage == 1:
            fb.append(Line("activations + gradients", acts.peak_with_gradients(4),
                           "measured peak of the pass, whole fp32 gradients kept"))
            st += [Line("gradients", 4 * Pz + 4 * Pp, "whole, fp32"),
                   Line("gradient partition", 4 * Pz // n, "fp32, reduced")]
        else:
            fb += [Line("activations + gradient partition", acts.peak_with_gradients(4 / n),
                        "measured peak of the pass, fp32 partitions kept"),
                   Line("reduction buckets", buckets * bucket,
                        f"{buckets} x min(zero_bucket_elements, parameters) fp32")]
            st.append(Line("gradient partition", 4 * Pz // n + 4 * Pp, "fp32 (prototypes whole)"))
        st.append(Line("step temporaries", int(t * (Pz / n + Pp)), "measured, on the partition"))
    reserve = []
    if target.gpu:
        tensors = Memory(resident, fb, st, []).tensors_peak
        reserve = [Line("CUDA context", CUDA_CONTEXT_BYTES, "driver, kernels, cuBLAS/cuDNN workspaces"),
                   Line("NCCL", NCCL_BYTES, "communicators' buffers"),
                   Line("allocator fragmentation", int(FRAGMENTATION * tensors),
                        f"{FRAGMENTATION:.0%} of the tensors' peak")]
    return Memory(resident, fb, st, reserve)


def queue_rows_of(cfg: Config, world: int) -> int:
    """This rank's (rank 0's) queued embeddings per assigned crop (build.build_queue)."""
    if not cfg.swav.queue_length:
        return 0
    return cfg.swav.queue_length // cfg.optim.batch_size * rank_batch(cfg.optim.batch_size, world, 0)


# ---- communication


@dataclass
class Collective:
    """One kind of collective of a step: how many, over how many ranks, and the bytes one rank sends (and as
    many receives) on NCCL's ring: all-reduce 2(n-1)/n S, all-gather and reduce-scatter (n-1)/n S."""

    what: str
    kind: str
    count: int
    ranks: int
    bytes_each: int  # S: the size of the whole reduced or gathered tensor

    @property
    def sent(self) -> int:
        if self.ranks <= 1:
            return 0
        factor = 2 if self.kind == "all-reduce" else 1
        return int(self.count * factor * (self.ranks - 1) / self.ranks * self.bytes_each)


def communication(cfg: Config, lay: Layout, sizes: ModelSizes, acts: Activations, local_world: int) -> list[Collective]:
    """The collectives of one (non-log) step of rank 0 (docs/plan.md)."""
    P, N = sizes.total, lay.world
    out: list[Collective] = []
    if N == 1 and not lay.wrapped:
        return out
    if lay.engine == "ddp":
        out.append(Collective("gradients", "all-reduce", 1, N, 4 * P))
    elif lay.engine == "fsdp":
        g = 2 if lay.bf16_units else 4
        n = lay.shard
        passes = 2 if cfg.parallel.fsdp_reshard_after_forward else 1
        trunk = sum(sizes.units)
        norms = sizes.unit_norms if lay.bf16_units else 0
        out += [Collective("trunk units' parameters", "all-gather", passes * len(sizes.units), n,
                           g * (trunk - norms) // len(sizes.units)),
                Collective("root unit's parameters (stem, head, prototypes)", "all-gather", 1, n, 4 * sizes.root),
                Collective("gradients", "reduce-scatter", len(sizes.units) + 1, n, 4 * (P - norms) // (
                    len(sizes.units) + 1))]
        if lay.replicas > 1:
            out.append(Collective("gradient shards across replicas (HSDP)", "all-reduce", len(sizes.units) + 1,
                                  lay.replicas, 4 * (P - norms) // n // (len(sizes.units) + 1)))
        if norms:
            out.append(Collective("units' BatchNorm gradients (whole)", "all-reduce", 1, N, 4 * norms))
        if cfg.optim.name == Optimizer.lars:
            out.append(Collective("LARS's parameter and gradient norms (DTensor)", "all-reduce", 2 * sizes.tensors,
                                  lay.shard, 4))
    else:
        stage = int(lay.engine[-1])
        Pz, Pp = P - sizes.prototypes, sizes.prototypes
        if stage in (1, 2):
            buckets = math.ceil(Pz / cfg.parallel.zero_bucket_elements)
            out += [Collective("gradient buckets", "all-reduce", buckets, N, 4 * Pz // buckets),
                    Collective("updated partitions", "all-gather", 1, N, 4 * Pz)]
        else:
            out += [Collective("parameters (forward and backward)", "all-gather", 2, N, 4 * Pz),
                    Collective("gradients", "reduce-scatter", 1, N, 4 * Pz)]
        out.append(Collective("prototypes' gradient", "all-reduce", 1, N, 4 * Pp))
    if cfg.parallel.sync_batchnorm and N > 1:
        bn = group_size(cfg.parallel.sync_batchnorm_group, N, local_world) or N
        calls, channels = len(acts.batchnorm_channels), sum(acts.batchnorm_channels)
        back_calls, back_channels = len(acts.batchnorm_backward_channels), sum(acts.batchnorm_backward_channels)
        out += [Collective("SyncBatchNorm statistics (forward and recomputations)",
                           "all-reduce", calls, bn, (8 * (2 * channels + calls)) // max(calls, 1)),
                Collective("SyncBatchNorm gradient sums (backward)", "all-reduce", back_calls, bn,
                           4 * 2 * back_channels // max(back_calls, 1))]
    k, assign = cfg.model.num_prototypes, len(cfg.swav.crops_for_assign)
    out.append(Collective("Sinkhorn row sums", "all-reduce", assign * cfg.swav.sinkhorn_iterations, N, 4 * k))
    return out


# ---- the plan


@dataclass
class Plan:
    cluster: Cluster
    layout: Layout
    batch: int
    precision: str
    checkpointing: str
    sizes: ModelSizes
    optimizer: OptimizerStep
    memory: Memory
    collectives: list[Collective]
    suggestions: list[Suggestion] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.memory.peak <= self.cluster.gpu_memory_gib * GiB

    def to_json(self) -> dict[str, Any]:
        m = self.memory
        return {
            "nodes": self.cluster.nodes, "gpus_per_node": self.cluster.gpus_per_node, "ranks": self.layout.world,
            "gpu_memory_gib": self.cluster.gpu_memory_gib, "engine": self.layout.name,
            "shard_ranks": self.layout.shard, "replicas": self.layout.replicas, "batch_per_rank": self.batch,
            "precision": self.precision, "activation_checkpointing": self.checkpointing,
            "parameters": self.sizes.total, "optimizer_state_copies": self.optimizer.state_copies,
            "memory_bytes": {part: [asdict(line) for line in getattr(m, part)]
                             for part in ("resident", "forward_backward", "optimizer_step", "reserve")},
            "tensors_peak_bytes": m.tensors_peak, "peak_bytes": m.peak, "peak_gib": round(m.peak / GiB, 3),
            "peak_phase": m.peak_phase, "fits": self.fits,
            "communication": [{**asdict(c), "sent_bytes": c.sent} for c in self.collectives],
            "sent_bytes_per_step": sum(c.sent for c in self.collectives),
            "suggestions": [asdict(s) for s in self.suggestions],
        }


def plan(cfg: Config, cluster: Cluster, target: Target = Target(), measured: Measurements | None = None) -> Plan:
    """The memory and communication of rank 0 (the largest batch where the global batch splits unevenly)."""
    cluster.check()
    world = cluster.world
    check_world(cfg, world)
    measured = measured or Measurements()
    lay = layout(cfg, world, cluster.gpus_per_node, target)
    dtype = autocast_dtype(cfg, target)
    batch = rank_batch(cfg.optim.batch_size, world, 0)
    shape = StepShape(batch, dtype, lay.bf16_units, str(cfg.parallel.activation_checkpointing),
                      queue_rows_of(cfg, world))
    sizes, acts, opt = measured.sizes(cfg), measured.step(cfg, shape), measured.optimizer(cfg, foreach=target.gpu)
    memory = engine_memory(cfg, lay, sizes, acts, opt, target)
    return Plan(cluster, lay, batch, "bf16" if dtype else "fp32", shape.checkpointing, sizes, opt, memory,
                communication(cfg, lay, sizes, acts, cluster.gpus_per_node))


# ---- what to change when it does not fit


@dataclass
class Suggestion:
    change: list[str]  # key=value overrides (or --nodes N)
    peak_gib: float
    fits: bool
    cost: str


def overridden(cfg: Config, overrides: list[str]) -> Config:
    """`cfg` with `key=value` overrides, checked as on loading."""
    merged = OmegaConf.merge(OmegaConf.structured(cfg), OmegaConf.from_dotlist(overrides))
    out: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    out.check()
    return out


def candidates(cfg: Config, cluster: Cluster) -> Iterator[tuple[list[str], str, Callable[[], tuple[Config,
                                                                                                    Cluster]]]]:
    """The changes that lower a rank's memory, cheapest in training time first: each (overrides, its cost, the
    changed config and cluster)."""
    p = cfg.parallel
    mode = str(cfg.parallel.activation_checkpointing)
    if mode != "stage":
        for new, cost in (("selective", "recomputes the blocks' cheap ops in backward"),
                          ("block", "recomputes each block's forward in backward (about 1/3 more compute)"),
                          ("stage", "recomputes each stage's forward in backward (about 1/3 more compute)")):
            if new != mode and not (mode == "block" and new == "selective"):
                change = [f"parallel.activation_checkpointing={new}"]
                yield change, cost, lambda change=change: (overridden(cfg, change), cluster)
    if p.precision == Precision.fp32:
        change = ["parallel.precision=bf16"]
        yield change, "bf16 autocast: half the activations' bytes (numerics change)", \
            lambda: (overridden(cfg, change), cluster)
    if p.engine == EngineKind.fsdp and not p.fsdp_reshard_after_forward:
        change = ["parallel.fsdp_reshard_after_forward=true"]
        yield change, "a second all-gather of the trunk per step", lambda: (overridden(cfg, change), cluster)
    if p.engine != EngineKind.fsdp:
        change = ["parallel.engine=fsdp"]
        yield change, "all-gathers and reduce-scatters in place of one all-reduce", \
            lambda: (overridden(cfg, change), cluster)
    if p.engine == EngineKind.fsdp and p.fsdp_unit == "stage" and not cfg.model.arch.is_vit:
        change = ["parallel.fsdp_unit=block"]
        yield change, "gathers each residual block on its own: more, smaller collectives", \
            lambda: (overridden(cfg, change), cluster)
    if p.engine == EngineKind.fsdp and cluster.world > 1:
        shard = group_size(p.fsdp_shard_group, cluster.world, cluster.gpus_per_node) or cluster.world
        if shard < cluster.world:
            change = ["parallel.fsdp_shard_group=0"]
            yield change, "gathers over all ranks, across nodes, instead of within a group", \
                lambda: (overridden(cfg, change), cluster)
    if cfg.optim.name != Optimizer.lars and not (p.engine == EngineKind.deepspeed and p.zero_stage == 3):
        change = ["parallel.engine=deepspeed", "parallel.zero_stage=3"]
        yield change, "ZeRO-3: gathers every layer twice a step", lambda: (overridden(cfg, change), cluster)
    for factor in (2, 4, 8):
        nodes = cluster.nodes * factor
        if cfg.optim.batch_size >= nodes * cluster.gpus_per_node:
            yield [f"--nodes {nodes}"], f"{factor}x the GPUs, 1/{factor} of the batch per GPU", \
                lambda nodes=nodes: (cfg, Cluster(nodes, cluster.gpus_per_node, cluster.gpu_memory_gib))


def suggest(cfg: Config, cluster: Cluster, target: Target = Target(),
            measured: Measurements | None = None) -> list[Suggestion]:
    """Each candidate change re-planned on fake tensors, those that lower the peak kept; the activation
    checkpointing modes and the node counts stop at the first that fits."""
    measured = measured or Measurements()
    current = plan(cfg, cluster, target, measured).memory.peak
    out: list[Suggestion] = []
    skip: set[str] = set()
    for change, cost, make in candidates(cfg, cluster):
        if change[0].split("=")[0].split(" ")[0] in skip:
            continue
        try:
            new_cfg, new_cluster = make()
            result = plan(new_cfg, new_cluster, target, measured)
        except ConfigError:
            continue  # a combination the config refuses (ZeRO-3 beside LARS, a stage of a ViT)
        except RuntimeError as e:  # a variant the fake run cannot trace: said, not hidden
            out.append(Suggestion(change, float("nan"), False, f"not measured: {str(e).splitlines()[0][:80]}"))
            continue
        if result.memory.peak >= current:
            continue  # no lower here (a sharding engine's buckets and gathers outweigh a small model's state)
        out.append(Suggestion(change, round(result.memory.peak / GiB, 2), result.fits, cost))
        family = change[0].split("=")[0].split(" ")[0]
        if result.fits and family in ("--nodes", "parallel.activation_checkpointing"):
            skip.add(family)  # the costlier values of the same key would fit too
    return out


def plan_with_suggestions(cfg: Config, cluster: Cluster, target: Target = Target()) -> Plan:
    measured = Measurements()
    result = plan(cfg, cluster, target, measured)
    if not result.fits:
        result.suggestions = suggest(cfg, cluster, target, measured)
    return result


def load_plan_config(path: str | None, overrides: list[str]) -> Config:
    """The config to plan: `path` with `overrides`, checked as `pretrain` checks it, except that the training
    data need not be given yet (the plan reads none of it)."""
    from swav_scale.config import load_config

    if not any(o.startswith("data.train_shards=") for o in overrides):
        overrides = [*overrides, "data.train_shards=(not read by the plan)"]
    return load_config(path, overrides)


# ---- the report


def format_plan(result: Plan) -> str:
    """The plan as text: the job, the per-rank memory line by line, communication, verdict, suggestions."""
    c, lay, m = result.cluster, result.layout, result.memory
    out = [f"{c.nodes} nodes x {c.gpus_per_node} GPUs = {lay.world} ranks, {c.gpu_memory_gib:g} GiB each; "
           f"engine {lay.name}; {result.batch} images per rank; {result.precision} autocast; activation "
           f"checkpointing {result.checkpointing}",
           f"model: {result.sizes.total / 1e6:,.1f}M parameters ({_gib(4 * result.sizes.total)} in fp32); "
           f"optimizer state {result.optimizer.state_copies:g} fp32 copies", "",
           "per-rank memory (GiB = 2^30 bytes)"]

    def block(title: str, lines: list[Line]) -> None:
        out.append(f"  {title}: {_gib(Memory.total(lines))}")
        for line in lines:
            out.append(f"    {line.name:<34} {line.bytes / GiB:9.2f}  {line.how}")

    block("resident through the step", m.resident)
    block("forward/backward peak, above it", m.forward_backward)
    block("optimizer step peak, above it", m.optimizer_step)
    if m.reserve:
        block("reserve", m.reserve)
    out.append(f"  peak: {_gib(m.peak)} (tensors {_gib(m.tensors_peak)}, at the {m.peak_phase})")
    out += ["", "communication per step (bytes one rank sends, and receives, on NCCL's rings)"]
    for col in result.collectives:
        out.append(f"  {col.what:<58} {col.count:5d} x {col.kind:<14} over {col.ranks:5d}  "
                   f"{col.sent / MiB:10.1f} MiB")
    out.append(f"  total: {sum(col.sent for col in result.collectives) / MiB:,.1f} MiB per rank and step")
    out.append("")
    verdict = "FITS" if result.fits else "DOES NOT FIT"
    out.append(f"verdict: {verdict}: {_gib(m.peak)} of {c.gpu_memory_gib:g} GiB per GPU")
    if result.suggestions:
        out.append("changes, cheapest first (each re-planned):")
        for s in result.suggestions:
            out.append(f"  {' '.join(s.change):<58} {s.peak_gib:7.2f} GiB  {'fits' if s.fits else 'no':<4}  "
                       f"{s.cost}")
    return "\n".join(out)
