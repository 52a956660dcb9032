"""DeepSpeed ZeRO 1/2/3: optimizer state (1), gradients (2) and parameters (3) partitioned over ranks.

DeepSpeed owns the trunk and the projection head. The prototypes stay outside it, replicated, with their own
optimizer of the same kind and a gradient all-reduce: ZeRO keeps parameters in flat buffers whose fp32
master copies it rewrites at every step, so neither SwAV's in-place normalisation of C before each step nor
leaving C out of a step while frozen (a None gradient, which also creates no optimizer state) can be done on
a partitioned C. C is K x 128 (0.4M parameters for K = 3000): replicating it costs nothing.

Precision: parameters and ZeRO's partitions stay fp32 and the forward runs under torch.autocast, as in the
other engines. DeepSpeed's own bf16 mode would cast BatchNorm weights to bf16 beside fp32 running
statistics, which torch's batch_norm refuses. With fp32 partitions ZeRO-3 means its fp32 master partition
to be the partition itself (stage3.py: "we don't need another copy of the weights"), but DeepSpeed compares a
torch.device with a str there, which is never equal, and keeps a second copy;
`share_master_partitions` restores the intended sharing.

Checkpoints: DeepSpeed's files (`save_checkpoint`) for its part, DCP for the prototypes. Resumed on another
number of ranks, the DeepSpeed files are converted to DeepSpeed's universal checkpoint first
(`deepspeed.checkpoint.ds_to_universal`) and loaded with `checkpoint.load_universal`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.checkpoint import ds_to_universal
from deepspeed.utils import safe_get_full_fp32_param
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import get_state_dict

from swav_scale.distributed import (DistEnv, all_reduce, barrier, ensure_process_group, in_group,
                                    waiting_for_one_rank, world_size)
from swav_scale.engines.base import (Autocast, GradSquares, autocast_dtype, broadcast_buffers, drop_grads,
                                     local_sum_of_squares, set_lr)
from swav_scale.engines.ddp import OptimizerFactory, load_dcp_state
from swav_scale.models.swav_model import embed, score_views
from swav_scale.swav import normalize_prototypes_

TAG = "zero"  # DeepSpeed's checkpoint tag: one per step-N directory, so the name need not vary


class Embedder(nn.Module):
    """Trunk + projection head: crops -> normalised embeddings. The part of the SwAV model DeepSpeed owns;
    parameter names match SwAVModel's (trunk.*, head.*).

    It enters the engine's autocast itself: DeepSpeed runs the forward inside `torch.autocast(enabled=False)`
    when it finds CUDA autocast on outside but no `torch_autocast` section in its config, which would train
    the trunk in fp32 on a GPU however parallel.precision reads."""

    def __init__(self, trunk: nn.Module, head: nn.Module, device_type: str, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.trunk, self.head = trunk, head
        self.device_type, self.dtype = device_type, dtype

    def forward(self, crops: list[Tensor]) -> Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype) if self.dtype else contextlib.nullcontext():
            return embed(self.trunk, self.head, crops)


class SwAVForward(nn.Module):
    """What the loop calls: DeepSpeed's embeddings scored by the replicated prototypes."""

    def __init__(self, embedder: nn.Module, prototypes: nn.Linear) -> None:
        super().__init__()
        self.embedder, self.prototypes = embedder, prototypes

    def forward(self, crops: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        return score_views(self.embedder(crops), self.prototypes, crops)


def deepspeed_config(stage: int, batch_per_rank: int, world_size: int, bucket_elements: int,
                     load_universal: bool = False, on_gpu: bool = False) -> dict:
    """DeepSpeed's config for this engine.

    On a GPU every stage reduces each gradient bucket on a stream of its own while backward goes on
    (`overlap_comm`, for a second bucket's worth of memory at stages 1 and 2), at the price of one host wait
    per step. In DeepSpeed's sources:
    - ZeRO-1/2 (stage_1_and_2.py): under overlap_comm `independent_gradient_partition_epilogue`, which runs
      once after each backward, calls `get_accelerator().synchronize()` (torch.cuda.synchronize: the whole
      device) once the last bucket's reduction is enqueued. The buckets themselves are ordered by stream waits
      only (`average_tensor`) on the path pinned here: contiguous gradient buckets, each all-reduced whole
      (`use_multi_rank_bucket_allreduce`), both DeepSpeed's defaults. The other paths would synchronise the
      device once per bucket or per destination rank under overlap_comm (`allreduce_and_copy`, reached through
      `buffered_reduce_fallback` without contiguous gradients or through `allreduce_no_retain` with per-rank
      reduces; `_allreduce_noncontiguous_bucket_preserving_fp32`, for bf16/fp16 parameters with fp32
      gradient accumulation, which this engine's fp32 partitions never use).
    - ZeRO-3 (stage3.py) waits on the host whatever overlap_comm says: its epilogue synchronises the
      reduction stream once per backward (without overlap_comm that stream is the compute stream itself), and
      `__reduce_and_partition_ipg_grads` waits for the event of the bucket three back, so that the host runs
      at most three buckets ahead of the reductions. overlap_comm is DeepSpeed's default there and adds no
      wait.
    Without overlap_comm the reductions of stages 1 and 2 run on the compute stream: ZeRO-2 stalls backward
    at every bucket for its reduction and ZeRO-1 reduces every gradient after backward, all of it exposed,
    and growing with the model and over slower links. The device-wide wait comes once, after the last bucket
    is enqueued; what it costs is the host's lead: the device idles while the host launches the optimizer
    step after it, once per step, whatever the model or the number of buckets.

    On the CPU gloo runs the collectives on the host threads backward needs, and DeepSpeed's default (overlap
    at stage 3 only) stays.

    ZeRO-1 and -2 skip their own gradient norm (`compute_grad_norm`): where DeepSpeed computes it, its fp32
    mode tests it for inf/NaN on the host in every step, waiting for the GPU. Nothing is clipped here and no
    loss is scaled, so the norm serves only the log, and `DeepSpeedEngine.step` computes it at log steps alone.
    ZeRO-3 has no such switch (docs/gpu.md)."""
    buckets = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size")
    overlap = {"overlap_comm": True} if on_gpu else {}
    # the reduction path without a device-wide wait per bucket under overlap_comm (DeepSpeed's defaults, kept)
    reduction = {"contiguous_gradients": True, "use_multi_rank_bucket_allreduce": True}
    norm = {"compute_grad_norm": False} if stage in (1, 2) else {}
    return {
        "train_micro_batch_size_per_gpu": batch_per_rank,
        "gradient_accumulation_steps": 1,
        "train_batch_size": batch_per_rank * world_size,
        "zero_optimization": {"stage": stage, **dict.fromkeys(buckets, bucket_elements), **overlap, **reduction,
                              **norm},
        "gradient_clipping": 0.0,  # DeepSpeed clips to norm 1 unless told otherwise; the other engines do not clip
        "zero_allow_untested_optimizer": True,  # our torch AdamW / SGD, which ZeRO partitions
        "steps_per_print": 2**62,  # the loop logs; DeepSpeed's own step prints would interleave with it
        "checkpoint": {"load_universal": load_universal},
    }


class DeepSpeedEngine(Autocast):
    def __init__(self, model: nn.Module, make_optimizer: OptimizerFactory, env: DistEnv, precision: str,
                 stage: int, batch_per_rank: int, bucket_elements: int) -> None:
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        ensure_process_group(env)
        os.environ.setdefault("LOCAL_RANK", str(env.local_rank))  # DeepSpeed asserts it, a lone process too
        self.device, self.env, self.stage, self.batch_per_rank = env.device, env, stage, batch_per_rank
        self.bucket_elements = bucket_elements
        self.dtype = autocast_dtype(precision, env.device)
        self.make_optimizer = make_optimizer
        # ZeRO flattens parameters into contiguous buffers; convolutions follow the channels-last inputs
        self.model = model.to(env.device, memory_format=torch.contiguous_format)
        self.prototypes: nn.Linear = model.prototypes
        self.prototype_optimizer = make_optimizer([self.prototypes.weight])
        self._replicated = nn.ModuleDict({"prototypes": self.prototypes})  # saved as prototypes.weight, as in DDP
        self._initialize(load_universal=False)

    def _initialize(self, load_universal: bool) -> None:
        embedder = Embedder(self.model.trunk, self.model.head, self.device.type, self.dtype)
        # DeepSpeed sets the current GPU to LOCAL_RANK unless told the device: where each task sees one GPU
        # (init_distributed takes cuda:0 there), LOCAL_RANK would name a GPU the task does not have
        device = argparse.Namespace(device_rank=self.device.index) if self.device.type == "cuda" else None
        self.ds, *_ = deepspeed.initialize(
            args=device,
            model=embedder,
            optimizer=self.make_optimizer(embedder.parameters()),
            config=deepspeed_config(self.stage, self.batch_per_rank, self.env.world_size, self.bucket_elements,
                                    load_universal, on_gpu=self.device.type == "cuda"),
            dist_init_required=False,
        )
        if self.stage == 3:
            share_master_partitions(self.ds.optimizer)
        self.wrapped = SwAVForward(self.ds, self.prototypes)

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.ds.optimizer, self.prototype_optimizer]

    def set_lr(self, lr: float) -> None:
        for optimizer in self.optimizers:
            set_lr(optimizer, lr)

    def normalize_prototypes(self) -> None:
        normalize_prototypes_(self.prototypes.weight)

    @torch.no_grad()
    def prototype_scores(self, embeddings: Tensor) -> Tensor:
        return self.prototypes(embeddings)

    def backward(self, loss: Tensor) -> None:
        self.ds.backward(loss)

    def freeze_prototypes(self) -> None:
        drop_grads([self.prototypes.weight])

    def step(self, measure_grad_norm: bool = False) -> GradSquares | None:
        grad = self.prototypes.weight.grad
        if grad is not None and in_group():
            all_reduce(grad).div_(world_size())  # a mean over ranks, as DDP and ZeRO average the other gradients
        prototypes_sq = local_sum_of_squares([grad] if grad is not None else [], self.device) if measure_grad_norm \
            else None
        self.prototype_optimizer.step()
        self.prototype_optimizer.zero_grad(set_to_none=True)
        # ZeRO-1/2 compute the norm of their gradient partitions only when asked (deepspeed_config), before the
        # step consumes them: the norm DeepSpeed's own step would have taken; ZeRO-3 takes it in every step
        zero_norm = self.ds.optimizer.scaled_global_norm() if measure_grad_norm and self.stage in (1, 2) else None
        self.ds.step()
        if prototypes_sq is None:
            return None
        # DeepSpeed's norm is already global (its own collective) and the prototypes' gradient is averaged:
        # both are whole on every rank, added on the device and left there
        if zero_norm is None:
            zero_norm = self.ds.get_global_grad_norm()
        zero_sq = zero_norm.to(prototypes_sq).square() if isinstance(zero_norm, Tensor) else float(zero_norm) ** 2
        return GradSquares(torch.zeros_like(prototypes_sq), prototypes_sq + zero_sq)

    def full_parameters(self) -> dict[str, Tensor]:
        """Every parameter whole, in float32, on every rank (gathered from the ZeRO partitions)."""
        params = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in self.ds.module.named_parameters()}
        return {**params, "prototypes.weight": self.prototypes.weight.detach().clone()}

    # ---- checkpoints: the prototypes through DCP, DeepSpeed's part in its own files
    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self._replicated, self.prototype_optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_dcp_state(self._replicated, self.prototype_optimizer, state)

    def agree_replicas(self) -> None:
        broadcast_buffers(self.ds.module)  # rank 0's BatchNorm statistics, as the other engines save

    def save_files(self, directory: Path) -> None:
        self.ds.save_checkpoint(str(directory), tag=TAG, save_latest=False)

    def load_files(self, directory: Path, saved_world_size: int) -> None:
        if saved_world_size == self.env.world_size:
            self._load(directory)
            return
        if not isinstance(self.prototype_optimizer, torch.optim.Adam | torch.optim.AdamW):
            raise RuntimeError(
                f"rank {self.env.rank}: {directory.parent} was saved by {saved_world_size} ranks and this run has "
                f"{self.env.world_size}. Changing the number of ranks under DeepSpeed goes through its universal "
                f"checkpoint, which carries Adam-family optimizer state only (SGD momentum fails with "
                f"KeyError 'exp_avg'). Resume on {saved_world_size} ranks, or train with optim.name=adamw"
            )
        universal = directory.parent / f".{directory.parent.name}-universal"
        with waiting_for_one_rank():  # rank 0 converts, the others wait for it
            if self.env.is_main:
                shutil.rmtree(universal, ignore_errors=True)
                convert_to_universal(directory / TAG, universal / TAG)
            barrier()
        # DeepSpeed reads this option from its config only; it affects loading alone, so the engine keeps it
        self._initialize(load_universal=True)
        try:
            self._load(universal)
        finally:
            barrier()
            if self.env.is_main:
                shutil.rmtree(universal, ignore_errors=True)

    def _load(self, directory: Path) -> None:
        path, _ = self.ds.load_checkpoint(str(directory), tag=TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"rank {self.env.rank}: DeepSpeed found no checkpoint in {directory / TAG}")


def share_master_partitions(optimizer: Any) -> None:
    """Make each fp32 master partition of a ZeRO-3 optimizer share its storage with the parameter partition
    it is a copy of, where both are fp32 on one device.

    That sharing is what DeepSpeed's stage 3 does when the model trains in fp32 under torch.autocast: its step
    then updates the master partition and copies it onto the parameter partition, a copy onto itself. The
    check that chooses it (`partition.device == self.device`, a torch.device against the str of
    `current_device_name()`) is never true, so each rank would hold its parameter partition twice
    (docs/benchmarks.md, "Per-rank memory of the engines"). Reassigning `.data` keeps the master tensors
    themselves, which the inner optimizer's param_groups and state are keyed by. A master partition that is not
    an exact copy (another dtype, offloading) is left alone.
    """
    low = getattr(optimizer, "fp16_partitioned_groups_flat", [])
    masters = getattr(optimizer, "fp32_partitioned_groups_flat", [])
    for partition, master in zip(low, masters):
        if (partition is not None and master.dtype == partition.dtype and master.device == partition.device
                and master.shape == partition.shape
                and master.untyped_storage().data_ptr() != partition.untyped_storage().data_ptr()
                and torch.equal(master, partition)):
            master.data = partition.data


def read_fp32_weights(directory: Path) -> dict[str, Tensor]:
    """The trunk's and head's weights, whole and in float32, from the files `save_files` wrote into
    `directory`: one process gathers them from every rank's ZeRO partitions, whatever number of ranks wrote
    them (for evaluation and export)."""
    return get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=TAG)


def convert_to_universal(source: Path, target: Path) -> None:
    """DeepSpeed's ds_to_universal, called in-process (rank 0): ZeRO partitions of any world size ->
    one file per parameter and optimizer state, which any world size can load."""
    args = argparse.Namespace(input_folder=str(source), output_folder=str(target), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    ds_to_universal.main(args)
