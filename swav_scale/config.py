"""Typed configuration: OmegaConf structured configs over dataclasses, one section per thing configured.

A run is described by one YAML file under configs/ plus `key=value` overrides. Every key is checked against
the schema below before anything starts: a misspelled key is an error naming the closest valid key, a value
of the wrong type or outside its choices (the Enums) an error naming the key. Then each section checks its own
values (`check`), and Config the ones that span sections; check_world adds those that need the number of
ranks. Every config check is here, so a mistake is found on loading, in the launching shell, not by one rank
half-way through a start.
"""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass, field, fields, is_dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from swav_scale.errors import SwavScaleError


class ConfigError(SwavScaleError, ValueError):
    """A configuration mistake, with a message that names the file and key and says what to do."""


# The choices a key takes. OmegaConf reads a member by its name, so names and values are the same lowercase
# words a YAML file holds; as StrEnums they also compare equal to those words and write them to JSON.

class Arch(StrEnum):
    """The trunks models/ builds (models.ARCHS lists the same names)."""
    resnet18 = "resnet18"
    resnet50 = "resnet50"
    resnet50w2 = "resnet50w2"
    resnet50w4 = "resnet50w4"
    resnet50w5 = "resnet50w5"
    vit_small = "vit_small"
    vit_base = "vit_base"
    regnety_400mf = "regnety_400mf"
    regnety_16gf = "regnety_16gf"
    regnety_128gf = "regnety_128gf"
    regnety_256gf = "regnety_256gf"
    regnety_10b = "regnety_10b"

    @property
    def is_vit(self) -> bool:
        return self.startswith("vit_")

    @property
    def is_regnet(self) -> bool:
        return self.startswith("regnet")


class EngineKind(StrEnum):
    """How the model is spread over the ranks (engines/): replicated (DDP), sharded by torch FSDP2, or by
    DeepSpeed ZeRO at parallel.zero_stage."""
    ddp = "ddp"
    fsdp = "fsdp"
    deepspeed = "deepspeed"


class Precision(StrEnum):
    """Autocast dtype: auto is bf16 where the GPU or CPU computes it natively, else fp32."""
    auto = "auto"
    bf16 = "bf16"
    fp32 = "fp32"


class ActivationCheckpointing(StrEnum):
    """What the trunk recomputes in backward instead of keeping from forward (engines/activation_checkpointing.py):
    nothing; the blocks' cheap ops (selective); each block; each stage. "none", not "off": YAML reads off as
    the boolean false."""
    none = "none"
    selective = "selective"
    block = "block"
    stage = "stage"


class FSDPUnit(StrEnum):
    """What FSDP2 gathers whole at a time in a ResNet or RegNet trunk: a stage, or a residual block (a ViT's
    units are its blocks either way)."""
    stage = "stage"
    block = "block"


class Optimizer(StrEnum):
    """LARS (SwAV's), SGD with momentum, AdamW (ViTs; ZeRO takes SGD and AdamW only: optim.py)."""
    lars = "lars"
    sgd = "sgd"
    adamw = "adamw"


@dataclass
class ModelConfig:
    arch: Arch = Arch.resnet50
    width: float | None = None  # overrides the arch's width multiplier (resnet18 at 0.5, say)
    small_stem: bool = False  # 3x3 stride-1 stem for 28-64 px images
    maxpool: bool = True  # False drops the stem max-pool (CIFAR-style), ~3x the compute
    # the projection MLP's hidden widths, in order; [] = a single Linear to embed_dim (models.ProjectionHead).
    # The key was once `hidden_dim: N`, which loading still reads as [N] ([] for 0), with a warning (_legacy_keys)
    hidden_dims: list[int] = field(default_factory=lambda: [2048])
    head_batchnorm: bool = True  # BatchNorm after each hidden Linear, as SwAV; false: Linear -> ReLU, as SEER
    embed_dim: int = 128
    num_prototypes: int = 3000
    drop_path_rate: float | None = None  # ViTs only: stochastic depth (None = 0.1, DINO's default)
    # ResNets only: the last BatchNorm of each residual branch starts at zero, so every block starts as the
    # identity (Goyal et al. 2017). false is the original's (resnet50.py's default, never changed by main_swav.py)
    zero_init_residual: bool = False

    def check(self) -> None:
        """The ResNet-only keys are refused for a ViT or RegNet rather than ignored, so a config never silently
        trains a different network than it names; the head's widths are checked here, not when the model is
        built on every rank."""
        if self.arch.is_vit or self.arch.is_regnet:
            what = ("a ViT has a fixed width and a patch embedding, no stem" if self.arch.is_vit else
                    "a RegNet's widths and stem follow from its design parameters")
            for key, default in (("width", None), ("small_stem", False), ("maxpool", True),
                                 ("zero_init_residual", False)):
                if getattr(self, key) != default:
                    raise ConfigError(f"model.{key}={getattr(self, key)} does not apply to model.arch={self.arch} "
                                      f"({what}): leave model.{key} at its default ({default})")
        if any(w <= 0 for w in self.hidden_dims):
            raise ConfigError(f"model.hidden_dims={list(self.hidden_dims)}: every hidden width must be positive; "
                              "give [] for a single Linear to model.embed_dim (no hidden layer)")
        if self.embed_dim <= 0 or self.num_prototypes <= 0:
            raise ConfigError(f"model.embed_dim={self.embed_dim} and model.num_prototypes={self.num_prototypes} "
                              "must both be positive (SwAV: 128 and 3000)")
        if self.arch.is_vit:
            return
        if self.drop_path_rate is not None:
            raise ConfigError(f"model.drop_path_rate applies to ViTs only, not to model.arch={self.arch}")
        if self.width is not None and (self.width <= 0 or abs(round(64 * self.width) - 64 * self.width) > 1e-6):
            raise ConfigError(f"model.width={self.width} must make 64*width a positive whole number of channels "
                              "(0.5, 1, 2, say)")


@dataclass
class CropsConfig:
    """Multi-crop: counts[i] crops of sizes[i] px with area scale in [min_scale[i], max_scale[i]].

    The first group holds the global crops, whose codes are computed (swav.crops_for_assign).
    """

    sizes: list[int] = field(default_factory=lambda: [224, 96])
    counts: list[int] = field(default_factory=lambda: [2, 6])
    min_scale: list[float] = field(default_factory=lambda: [0.14, 0.05])
    max_scale: list[float] = field(default_factory=lambda: [1.0, 0.14])
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # crop aspect ratios (log-uniform)
    color_jitter: list[float] = field(default_factory=lambda: [0.8, 0.8, 0.8, 0.2])  # brightness contrast sat hue
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    # jitter, grayscale and blur in batch on the training device instead of in the data workers (for GPUs
    # whose CPUs cannot keep up: the workers then only decode, crop and flip; benchmarks/bench_data.py)
    color_on_device: bool = False
    reduced_decode: bool = True  # decode large JPEGs at 1/2-1/8 size where no crop loses resolution by it
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])

    def check(self) -> None:
        n = len(self.sizes)
        for name in ("counts", "min_scale", "max_scale"):
            if len(getattr(self, name)) != n:
                raise ConfigError(f"crops.{name} has {len(getattr(self, name))} entries but crops.sizes has {n}")
        if len(self.ratio) != 2 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ConfigError(f"crops.ratio={self.ratio}: give [lowest, highest] aspect ratio, 0 < lowest <= highest")
        if len(self.color_jitter) != 4:
            raise ConfigError("crops.color_jitter needs 4 entries: brightness, contrast, saturation, hue")
        if sum(self.counts) < 2:
            raise ConfigError("SwAV needs at least 2 crops per image (crops.counts)")


@dataclass
class DataConfig:
    # a directory holding *.tar shards and manifest.json (tools/make_shards.py), an http(s) URL of one, or a brace
    # pattern of paths / URLs / pipe: commands (train-{000000..000999}.tar); see swav_scale/data/sources.py
    train_shards: str = MISSING
    train_manifest: str = ""  # manifest.json path or URL, when it is not beside the shards (pipe: sources)
    num_workers: int = 4  # data-loading processes per rank
    open_shards: int = 4  # shards each worker reads at once, round robin
    shuffle_buffer: int = 2000  # samples each worker reads, then emits in a random order (a block)
    max_bad_fraction: float = 0.01  # unreadable samples (replaced in their batch) tolerated per epoch
    ledger: bool = False  # write the keys of every step's samples to run_dir/ledger/rank-R.jsonl (audits)
    prefetch_factor: int = 2


@dataclass
class SwAVConfig:
    epsilon: float = 0.05  # entropy regularisation of the Sinkhorn problem
    sinkhorn_iterations: int = 3
    temperature: float = 0.1  # tau of softmax(C.z / tau)
    crops_for_assign: list[int] = field(default_factory=lambda: [0, 1])
    freeze_prototypes_iters: int = 313
    queue_length: int = 0  # global queue length (all ranks); 0 = no queue
    queue_start_epoch: int = 15

    def check(self) -> None:
        if self.sinkhorn_iterations < 1:
            raise ConfigError(f"swav.sinkhorn_iterations={self.sinkhorn_iterations}: Sinkhorn needs at least 1 "
                              "iteration to give codes that are distributions (SwAV uses 3)")
        for name in ("epsilon", "temperature"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"swav.{name}={getattr(self, name)} must be positive (SwAV: epsilon 0.05, "
                                  "temperature 0.1)")


@dataclass
class OptimConfig:
    name: Optimizer = Optimizer.lars  # ZeRO needs sgd or adamw: see swav_scale/optim.py
    epochs: int = 100
    batch_size: int = 4096  # global: summed over all ranks
    base_lr: float = 4.8
    final_lr: float = 0.0048
    warmup_epochs: float = 10
    start_warmup_lr: float = 0.3
    weight_decay: float = 1e-6
    momentum: float = 0.9  # SGD/LARS momentum; AdamW's beta1
    beta2: float = 0.999  # AdamW only
    trust_coeff: float = 0.001  # LARS
    # false: weight decay and LARS adaptation for every parameter, as the original (LARC over all of
    # model.parameters()); true: not for biases and norm parameters, as BYOL, DINO and most later work do
    exclude_bias_and_norm: bool = False

    def check(self) -> None:
        if self.batch_size <= 0:
            raise ConfigError(f"optim.batch_size={self.batch_size}: give the global batch, summed over all ranks")


@dataclass
class TrainConfig:
    """What run this is: where it lives, its seed, and where it stops early."""

    run_dir: str = "runs/swav"
    seed: int = 31
    max_steps: int = 0  # stop after this many steps (0 = run all epochs); for tests and smoke runs


@dataclass
class ParallelConfig:
    """How the run is spread over ranks and computed on each: the engine, its sharding, BatchNorm's groups,
    precision, kernels, and how ranks reach each other."""

    engine: EngineKind = EngineKind.ddp  # ZeRO's stage: parallel.zero_stage
    zero_stage: int = 2  # DeepSpeed ZeRO stage 1 | 2 | 3 (parallel.engine=deepspeed only)
    # ZeRO's gradient-reduction and parameter-gather buckets, in elements. DeepSpeed's default (5e8) exceeds
    # most models, so the whole gradient would sit in one bucket beside its partitions (docs/benchmarks.md
    # measures ZeRO-3's memory with both). Larger: fewer collectives.
    zero_bucket_elements: int = 25_000_000
    # FSDP2: free each gathered trunk unit after its forward (true), or keep it until its backward (false):
    # two all-gathers of the trunk a step, or one, for the memory of the whole unsharded trunk from forward
    # to backward (docs/scaling.md and docs/benchmarks.md measure both).
    fsdp_reshard_after_forward: bool = True
    # FSDP2's unit in a ResNet or RegNet trunk, gathered whole for its forward and backward: a stage (4 gathers a
    # pass), or a residual block (one per block: RegNetY-256GF 27, RegNet-10B 27), for trunks whose largest stage
    # is too large to gather whole with its gradient (RegNet-10B's third: 6.9B parameters, 14 GB in bf16 and 28 GB
    # of fp32 gradient). More, smaller collectives; the same arithmetic. A ViT's units are its blocks either way.
    fsdp_unit: FSDPUnit = FSDPUnit.stage
    # FSDP2: shard within groups of this many consecutive ranks and replicate across the groups (HSDP, torchtitan's
    # data_parallel_shard_degree); 0 shards over all ranks; -1, the default, over all ranks up to 64 and over a
    # node's ranks beyond (as sync_batchnorm_group). A node's GPUs keep every all-gather and reduce-scatter on
    # NVLink, and only the replicas' gradient all-reduce crosses nodes: at 4096 ranks a 1-D mesh makes every
    # gather a ring over all of them (docs/scaling.md).
    fsdp_shard_group: int = -1
    # torch.compile each trunk unit (ResNet stage, ViT block) in place; engines.assemble.compile_units says how
    # and why. Compiling costs a minute or more at start-up and again on each resume. Not with ZeRO-3 (its
    # hooks on every layer would be traced into the graphs).
    compile: bool = False
    # BatchNorm statistics over the global batch on 2+ ranks, GPU or CPU, as SwAV (engines/sync_batchnorm.py)
    sync_batchnorm: bool = True
    # Ranks per SyncBatchNorm group: 0, all ranks; N, blocks of N consecutive ranks (the original's
    # syncbn_process_group_size; 8 keeps BatchNorm's per-layer collectives inside a node of 8 GPUs); -1, the
    # default, all ranks up to 64 and a node's ranks beyond, where collectives over all ranks at every BatchNorm
    # layer would cost more than the statistics of a larger batch give (engines/assemble.py, docs/scaling.md).
    sync_batchnorm_group: int = -1
    precision: Precision = Precision.auto
    # Keep fewer of the trunk's activations for backward and recompute them there: none; selective (each block
    # keeps its convolutions', matrix products' and attention's outputs, recomputes the elementwise rest: the
    # least saved, at the least cost); block (each block keeps its input only: one more forward of the trunk);
    # stage (each ResNet/RegNet stage keeps its input only; a stage's activations live while it is recomputed).
    # docs/benchmarks.md measures each (RN50-w2: 15%, 62%, 47% of the activations saved). Gradients
    # and parameters equal the run without it bit for bit where the kernels are deterministic
    # (engines/activation_checkpointing.py; docs/training.md says which to choose).
    activation_checkpointing: ActivationCheckpointing = ActivationCheckpointing.none
    channels_last: bool = True  # NHWC convolutions: faster on CPU (oneDNN), the fast path on GPU
    # GPU: cuDNN times its convolution algorithms for each shape on first use and keeps the fastest, as the
    # original sets cudnn.benchmark. The crop sizes never change, so that costs only the first steps. false:
    # the same algorithms run to run (with deterministic inputs, the same results).
    cudnn_benchmark: bool = True
    # How long a training collective may wait for the slowest rank before the job fails (s). A rank that hangs
    # rather than dies (a stuck file system, a GPU fault) holds every rank this long, so it is minutes, not an
    # hour; it must exceed a step and an epoch end's evaluation.
    collective_timeout_s: int = 600
    # How long the ranks may wait while one of them works alone (s): rank 0's checks of the data and the
    # checkpoints at start, DeepSpeed's universal conversion on a change of world size (distributed
    # .waiting_for_one_rank). NCCL's own default (10 min) is shorter than a universal conversion of a wide ResNet
    # can take. The saves' collectives keep collective_timeout_s (their ranks work alike: each hashes a share; rank
    # 0 prunes old checkpoints after the last one), so a node lost during a background save fails it as fast.
    wait_timeout_s: int = 3600
    # Steps between posting the ranks' stop flags (a signal, the save clock) and reading their reduction
    # (preemption.StepAgreement). 0: measured over the first steps, 1 where the reduction completes within a
    # step (a few nodes), more where a ring over thousands of ranks takes longer than a step; bounded so that a
    # signal waits at most slurm.signal_delay_s / 20 for the agreed step.
    agreement_lag: int = 0
    # The network interface(s) the ranks talk over, comma-separated (sets GLOO_SOCKET_IFNAME and
    # NCCL_SOCKET_IFNAME). Empty: gloo takes the address the hostname resolves to, NCCL its own choice. Set it
    # where the hostname resolves to the wrong network (a management LAN, loopback) or to pick InfiniBand's IPoIB.
    socket_ifname: str = ""

    def check(self) -> None:
        if self.zero_stage not in (1, 2, 3):
            raise ConfigError(f"parallel.zero_stage={self.zero_stage}: DeepSpeed ZeRO has stages 1, 2 and 3")
        if self.zero_bucket_elements < 1:
            raise ConfigError(f"parallel.zero_bucket_elements={self.zero_bucket_elements}: a bucket holds at least "
                              "one element (25000000 is the default)")
        if self.compile and self.engine == EngineKind.deepspeed and self.zero_stage == 3:
            raise ConfigError("parallel.compile=true with ZeRO-3: DeepSpeed gathers each layer's parameters in hooks "
                              "that torch.compile would trace into the graph. Use parallel.engine=fsdp (which "
                              "compiles per unit, outside its gathers), ZeRO-1/2, or parallel.compile=false")
        if self.compile and self.activation_checkpointing != ActivationCheckpointing.none:
            # dynamo traces torch.utils.checkpoint into a higher-order op that refuses the BatchNorm buffers' updates
            # in the checkpointed region (torch 2.14), and cannot trace the context that keeps them
            raise ConfigError(f"parallel.compile=true with parallel.activation_checkpointing="
                              f"{self.activation_checkpointing}: torch.compile cannot trace the recomputed units. Set "
                              "parallel.compile=false to save the activations' memory, or "
                              "parallel.activation_checkpointing=none to compile")
        if self.fsdp_shard_group < -1:
            raise ConfigError(f"parallel.fsdp_shard_group={self.fsdp_shard_group}: give the ranks each shard group "
                              "holds (8 = a node of 8 GPUs), 0 to shard over all ranks, or -1 for all up to 64 ranks "
                              "and a node's beyond")
        if self.sync_batchnorm_group < -1:
            raise ConfigError(f"parallel.sync_batchnorm_group={self.sync_batchnorm_group}: give the ranks per "
                              "group (8 = one node of 8 GPUs), 0 for all ranks, or -1 for all up to 64 ranks and "
                              "a node's beyond")
        if self.collective_timeout_s <= 0 or self.wait_timeout_s <= 0:
            raise ConfigError(f"parallel.collective_timeout_s={self.collective_timeout_s} and parallel.wait_timeout_s="
                              f"{self.wait_timeout_s}: give the seconds a collective may wait for the slowest rank "
                              "(600 and 3600, say)")
        if self.agreement_lag < 0:
            raise ConfigError(f"parallel.agreement_lag={self.agreement_lag}: give the steps between posting the stop "
                              "flags and reading them, or 0 to measure them at the start")


@dataclass
class CheckpointConfig:
    """When checkpoints are written and what is kept (checkpoint/manager.py's Checkpointer owns the policy)."""

    # Save once this many minutes have passed since the start or the last save, by rank 0's clock (0: never),
    # the default: a step count means a different wall time on every cluster and scale (500 RN50 steps are an
    # hour on 8 GPUs and seconds at 4096 ranks, less than a save takes); a time bounds the work a preemption
    # can lose and the time spent saving, whatever the scale. A checkpoint is also written at every epoch's end
    # and on a stop.
    every_minutes: float = 30.0
    every_steps: int = 0  # also every this many steps (0: none by steps), for runs whose step time is known
    keep: int = 3  # the newest N complete ones; never fewer than 1
    checksums: bool = True  # sha256 of every file, checked on resume (each rank hashes a share)
    # Periodic saves in the background: each rank copies its state to host memory (one more copy of it, kept) and
    # trains on while a thread writes, hashes and commits it. Saves on a stop and at the end are synchronous,
    # and all of them under DeepSpeed (its ZeRO files are written by collectives of the training group).
    background: bool = True

    def check(self) -> None:
        if self.every_steps < 0:
            raise ConfigError(f"checkpoint.every_steps={self.every_steps}: give the steps between checkpoints, or 0 "
                              "for epoch ends and stops only")
        if self.every_minutes < 0:
            raise ConfigError(f"checkpoint.every_minutes={self.every_minutes}: give the minutes between saves, or 0 "
                              "for none by time")
        if self.keep < 1:
            raise ConfigError(f"checkpoint.keep={self.keep}: keep at least the newest checkpoint (1), or resume "
                              "has nothing to start from")


@dataclass
class LoggingConfig:
    """What the run reports (train.StepLog): metrics.jsonl, TensorBoard, the console."""

    every_steps: int = 10  # also the last step and every epoch's end
    tensorboard: bool = True

    def check(self) -> None:
        if self.every_steps < 1:
            raise ConfigError(f"logging.every_steps={self.every_steps}: give the steps between log lines (1 or more)")


@dataclass
class EvalConfig:
    """Evaluation of the frozen trunk (`swav-scale knn`, `swav-scale linear`, kNN during pretraining). Features
    are taken of the whole image: resize the short side to `resize`, centre-crop `crop`."""

    train_shards: str = ""  # kNN bank (shards or an ImageFolder); defaults to data.train_shards
    test_shards: str = ""  # kNN queries (shards or an ImageFolder)
    every_epochs: int = 0  # kNN during pretraining after every this many epochs (0: never), logged as knn_top1
    resize: int = 256
    crop: int = 224
    k: int = 20
    temperature: float = 0.07
    batch_size: int = 256  # feature extraction
    # Re-estimate every BatchNorm's statistics on this many training images, transformed as for the features,
    # before extracting them (PreciseBN at the evaluation size; swav_scale/eval/precise_bn.py). 0: keep the
    # trained network's running statistics, which come from augmented training crops (DINO's kNN protocol).
    precise_bn_images: int = 0
    # linear probe on the frozen features: SGD with momentum, cosine schedule from linear_lr (per 256 samples)
    linear_epochs: int = 100
    linear_batch_size: int = 256
    linear_lr: float = 0.1
    linear_momentum: float = 0.9
    linear_weight_decay: float = 0.0

    def check(self) -> None:
        if self.every_epochs > 0 and not self.test_shards:
            raise ConfigError(f"eval.every_epochs={self.every_epochs} runs kNN during pretraining, on "
                              "eval.test_shards, which is not set: give the held-out split (shards or an "
                              "ImageFolder), or set eval.every_epochs=0")
        if self.precise_bn_images < 0:
            raise ConfigError(f"eval.precise_bn_images={self.precise_bn_images}: give the number of training images "
                              "to re-estimate BatchNorm statistics on (10000, say), or 0 to keep the trained ones")

    def test_split(self) -> str:
        """eval.test_shards, which every evaluation needs (the bank defaults to the training shards)."""
        if not self.test_shards:
            raise ConfigError("eval.test_shards is not set: give the test split (a shard directory or an "
                              "ImageFolder)")
        return self.test_shards


@dataclass
class SlurmConfig:
    """`swav-scale submit`: the SLURM job, through submitit. One task per GPU (or `tasks_per_node` on CPU nodes);
    empty strings and zeros leave the cluster's defaults."""

    nodes: int = 1
    gpus_per_node: int = 8  # one task per GPU; 0 for CPU nodes (then tasks_per_node)
    tasks_per_node: int = 0  # 0 = gpus_per_node
    cpus_per_task: int = 10
    mem_gb: int = 0  # per node
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    time_min: int = 4320  # the job's time limit; the run requeues itself when it is reached
    signal_delay_s: int = 120  # SIGUSR2 this long before the time limit: one step plus a checkpoint must fit
    max_requeues: int = 100  # after this many restarts on a preemption or the time limit the job ends
    # after this many failed starts (a rank died or hung; counted apart from preemptions) the job ends
    max_failures: int = 3
    # after a failure, the hosts that failed (their connections reset, or after a time-out those that do not
    # answer on the network) are left out of the requeued job's next start, while the partition keeps enough
    # other nodes for it
    exclude_lost_hosts: bool = True
    job_name: str = "swav"
    # rank 0's rendezvous port; 0 = derived from the job id (20000 + id % 40000), so that two jobs sharing a
    # node never pick the same one, and a requeued job keeps its port
    master_port: int = 0
    log_dir: str = ""  # submitit's logs; default run_dir/slurm
    additional: dict[str, Any] = field(default_factory=dict)  # more #SBATCH keys, e.g. {exclusive: true}
    setup: list[str] = field(default_factory=list)  # shell lines before the tasks start (module load ...)

    def check(self) -> None:
        if self.nodes < 1:
            raise ConfigError(f"slurm.nodes={self.nodes}: a job runs on 1 node or more")
        if self.max_requeues < 0 or self.max_failures < 0:
            raise ConfigError("slurm.max_requeues and slurm.max_failures count restarts: 0 or more")
        if self.gpus_per_node < 0 or self.tasks_per_node < 0:
            raise ConfigError("slurm.gpus_per_node and slurm.tasks_per_node count GPUs and ranks: 0 or more")
        if self.gpus_per_node == 0 and self.tasks_per_node == 0:
            raise ConfigError("slurm.gpus_per_node=0 needs slurm.tasks_per_node (the ranks per CPU node)")
        if self.master_port and not 1024 <= self.master_port <= 65535:
            raise ConfigError(f"slurm.master_port={self.master_port}: give a port from 1024 to 65535, or 0 to "
                              "derive it from the job id")

    @property
    def ranks_per_node(self) -> int:
        """One rank per GPU, or tasks_per_node where it is set (CPU nodes)."""
        return self.tasks_per_node or self.gpus_per_node


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    swav: SwAVConfig = field(default_factory=SwAVConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def check(self) -> None:
        """Each section's own checks, then those that span sections."""
        for f in fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "check"):
                section.check()
        total_crops = sum(self.crops.counts)
        for i in self.swav.crops_for_assign:
            if not 0 <= i < total_crops:
                raise ConfigError(f"swav.crops_for_assign names crop {i}, but crops.counts gives {total_crops} crops")
        if self.parallel.engine == EngineKind.deepspeed and self.optim.name == Optimizer.lars:
            raise ConfigError(
                "optim.name=lars with parallel.engine=deepspeed: ZeRO steps the optimizer on flat shards that cut "
                "through layers, so LARS's per-layer trust ratio would be computed on the wrong tensors "
                "(DeepSpeed issue #490) and training would silently take wrong steps. Use optim.name=adamw or "
                "optim.name=sgd with DeepSpeed, or parallel.engine=fsdp, whose LARS equals the DDP one"
            )
        if self.model.arch.is_vit and self.parallel.activation_checkpointing == ActivationCheckpointing.stage:
            raise ConfigError("parallel.activation_checkpointing=stage: a ViT's blocks are its only units (it has no "
                              f"stages, model.arch={self.model.arch}); use block or selective")
        # the queue holds whole global batches, so every rank's slice advances by its own batch each step
        b, q = self.optim.batch_size, self.swav.queue_length
        if q and q % b:
            raise ConfigError(f"swav.queue_length={q} is not a multiple of the global batch optim.batch_size={b}; "
                              f"use e.g. {max(1, q // b) * b}")


def _unknown_keys(node: Any, schema: type, prefix: str = "") -> list[tuple[str, list[str]]]:
    """Keys of `node` that `schema` lacks, each with its valid siblings (for the suggestion)."""
    if not isinstance(node, dict):
        return []
    valid = {f.name: f for f in fields(schema)}
    bad = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        if key not in valid:
            bad.append((path, [f"{prefix}{v}" for v in valid]))
            continue
        default = valid[key].default_factory() if callable(valid[key].default_factory) else valid[key].default
        if is_dataclass(default):
            bad += _unknown_keys(value, type(default), path + ".")
    return bad


def _check_keys(node: DictConfig, source: str) -> None:
    bad = _unknown_keys(OmegaConf.to_container(node, resolve=False), Config)
    if bad:
        lines = []
        for path, valid in bad:
            close = difflib.get_close_matches(path, valid, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'?" if close else "valid keys here: " + ", ".join(valid)
            lines.append(f"  unknown key '{path}': {hint}")
        raise ConfigError(f"{source}:\n" + "\n".join(lines))


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. optim.epochs=10)")
    return OmegaConf.from_dotlist(list(overrides))


_OVERRIDES = "command-line overrides"  # the source load_config names its key=value layer by


def _legacy_keys(layer: DictConfig, source: str) -> None:
    """Rewrites, in `layer`, the keys that have since changed form, each with a warning that says what to write
    instead: old YAML files, overrides, and a run's saved config.yaml (which resume reads) keep loading as they
    did. This is the one place that knows them; the schema has only the new forms.

    `model.hidden_dim: N` (one hidden width, 0 = none) became `model.hidden_dims: [N]` (0: [])."""
    model = layer.get("model") if "model" in layer else None
    if not isinstance(model, DictConfig) or "hidden_dim" not in model:
        return
    if "hidden_dims" in model:
        raise ConfigError(f"{source}: gives both model.hidden_dim and model.hidden_dims; model.hidden_dim is the "
                          "old form of model.hidden_dims: keep only model.hidden_dims")
    value = model.pop("hidden_dim")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{source}: model.hidden_dim={value!r} is not a width (the old form of model.hidden_dims): "
                          "write model.hidden_dims: [W] with W > 0, or [] for a single Linear")
    dims = [value] if value else []
    model["hidden_dims"] = dims
    instead = (f"give model.hidden_dims={dims} instead" if source == _OVERRIDES else
               f"write `model.hidden_dims: {dims}` there instead")
    warnings.warn(f"{source}: model.hidden_dim is the old form of model.hidden_dims and is read as "
                  f"model.hidden_dims: {dims}; {instead}", FutureWarning, stacklevel=4)


def _build(layers: list[tuple[str, DictConfig]]) -> Config:
    """Schema defaults <- each (source, layer) in turn: old key forms rewritten, keys checked, values typed, the
    result checked."""
    merged = OmegaConf.structured(Config)
    for source, layer in layers:
        _legacy_keys(layer, source)
        _check_keys(layer, source)
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or "?"
            message = str(e).splitlines()[0]
            if message.startswith(("Invalid value 'False'", "Invalid value 'True'")):
                message += " (YAML reads off, no, on and yes as booleans: write one of the words listed)"
            raise ConfigError(f"{source}: key '{key}': {message}") from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(
            "required keys without a value: " + ", ".join(missing) + " (set them in the YAML file or as key=value)"
        )
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    cfg.check()
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Schema defaults <- YAML file <- `key=value` overrides, validated; returns a typed Config."""
    layers: list[tuple[str, DictConfig]] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; the shipped ones are under configs/")
        layers.append((str(path), _parse_yaml(path.read_text(), str(path))))
    if overrides:
        layers.append((_OVERRIDES, _parse_overrides(list(overrides))))
    return _build(layers)


def _parse_yaml(text: str, source: str) -> DictConfig:
    try:
        loaded = OmegaConf.create(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{source}: expected a mapping of sections (model:, data:, ...) at the top level")
    return loaded


def rank_batch(global_batch: int, world_size: int, rank: int) -> int:
    """Rank `rank`'s samples per step: the global batch split as evenly as it goes, the first
    (global_batch mod world_size) ranks taking one more. Any world size trains the same global batch, so a job
    that loses a node resumes on the nodes left; the loss and Sinkhorn stay exact over the global batch
    (train.swav_step weighs each rank's loss by its share, swav.sinkhorn counts the global columns)."""
    return global_batch // world_size + (rank < global_batch % world_size)


def rank_share(global_batch: int, world_size: int, rank: int) -> float:
    """Rank `rank`'s batch over the mean batch of a rank (1.0 where the global batch splits evenly)."""
    return rank_batch(global_batch, world_size, rank) * world_size / global_batch


def check_world(cfg: Config, world_size: int) -> None:
    """The checks that need the number of ranks."""
    b, p = cfg.optim.batch_size, cfg.parallel
    if p.sync_batchnorm_group > 0 and world_size % p.sync_batchnorm_group:
        raise ConfigError(f"parallel.sync_batchnorm_group={p.sync_batchnorm_group} does not divide the {world_size} "
                          f"ranks into whole groups; use a divisor of {world_size} (the GPUs of a node), or 0 for all "
                          "ranks")
    if p.engine == EngineKind.fsdp and p.fsdp_shard_group > 0 and world_size % p.fsdp_shard_group:
        raise ConfigError(f"parallel.fsdp_shard_group={p.fsdp_shard_group} does not divide the {world_size} ranks "
                          f"into whole shard groups; use a divisor of {world_size} (the GPUs of a node), or 0")
    if b < world_size:
        raise ConfigError(f"optim.batch_size={b} (global) gives some of the {world_size} ranks no sample; use at "
                          f"least {world_size}, or fewer ranks")
    if p.compile and p.sync_batchnorm and world_size > 1:
        # dynamo cannot trace SyncBatchNorm's collectives (pytorch/pytorch#161302): every compiled stage would
        # break at each BatchNorm, so the pair is refused rather than trained that way
        raise ConfigError(
            f"parallel.compile=true with parallel.sync_batchnorm=true on {world_size} ranks: torch.compile cannot "
            "trace SyncBatchNorm, which would break every compiled stage at each BatchNorm. Set "
            "parallel.compile=false to keep BatchNorm statistics over the global batch (as SwAV does), or "
            "parallel.sync_batchnorm=false to compile, each rank then normalising with its own batch's statistics")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml_text(text: str, source: str = "configuration text") -> Config:
    """A Config from YAML text (a run's saved config.yaml, the config a job carries to its ranks), checked as
    load_config checks a file."""
    return _build([(source, _parse_yaml(text, source))])
