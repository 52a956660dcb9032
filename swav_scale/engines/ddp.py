"""Data parallel: every rank holds the whole model and optimizer; gradients are all-reduced during backward."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel

from swav_scale.distributed import DistEnv, in_group
from swav_scale.engines.base import (Autocast, GradSquares, autocast_dtype, broadcast_buffers, drop_grads,
                                     local_sum_of_squares, set_lr)
from swav_scale.swav import normalize_prototypes_

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class TorchEngine(Autocast):
    """What DDP and FSDP2 share: one torch optimizer over the (possibly sharded) model, state in DCP format."""

    model: nn.Module
    wrapped: nn.Module
    optimizer: torch.optim.Optimizer

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def backward(self, loss: Tensor) -> None:
        loss.backward()  # DDP all-reduces, FSDP2 reduce-scatters each unit's gradients as its backward ends

    def freeze_prototypes(self) -> None:
        drop_grads([self.model.prototypes.weight])

    def step(self, measure_grad_norm: bool = False) -> GradSquares | None:
        squares = self.grad_squares() if measure_grad_norm else None  # before the step consumes the gradients
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return squares

    def grad_squares(self) -> GradSquares:
        """DDP's gradients are already averaged and whole on every rank: all `whole`, no communication."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        whole = local_sum_of_squares(grads, self.device)
        return GradSquares(torch.zeros_like(whole), whole)

    def agree_replicas(self) -> None:
        broadcast_buffers(self.model)  # buffers are replicated under both: save rank 0's

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.wrapped, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_dcp_state(self.wrapped, self.optimizer, state)


# Newer torch releases name the switch `forward_sync_buffers` and warn on `broadcast_buffers` (with it DDP still
# broadcasts the buffers once when it is built, which changes nothing here: the replicas start equal); older
# releases know only `broadcast_buffers`.
NO_FORWARD_BUFFER_SYNC = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})


class DDPEngine(TorchEngine):
    def __init__(self, model: nn.Module, make_optimizer: OptimizerFactory, env: DistEnv, precision: str) -> None:
        self.model = model.to(env.device)
        self.device = env.device
        if in_group():  # on a GPU always, one rank too: the path a single-GPU run takes is the cluster's
            # No broadcast of every buffer from rank 0 before each forward (DDP's default): the buffers are
            # BatchNorm's running statistics, which a training forward never reads; with SyncBatchNorm every rank
            # computes the same ones from the global batch, and without it the copies that are read are agreed
            # where they are read: a save takes rank 0's (agree_replicas), evaluation during training and
            # export use rank 0's (knn_during_training, the checkpoint). The default would cost one broadcast
            # per BatchNorm buffer and forward, latency-bound, for nothing.
            # The gradients are views of the reducer's buckets, not a second copy of them: 4 bytes a parameter
            # less from the second step on (5.3 GB for RegNetY-256GF with SEER's head), and no copy between
            # the two in every backward.
            self.wrapped = DistributedDataParallel(
                self.model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                gradient_as_bucket_view=True, **NO_FORWARD_BUFFER_SYNC,
            )
        else:
            self.wrapped = self.model
        self.optimizer = make_optimizer(self.model.parameters())
        self.dtype = autocast_dtype(precision, env.device)

    def normalize_prototypes(self) -> None:
        normalize_prototypes_(self.model.prototypes.weight)

    @torch.no_grad()
    def prototype_scores(self, embeddings: Tensor) -> Tensor:
        return self.model.prototypes(embeddings)

    def full_parameters(self) -> dict[str, Tensor]:
        """Every parameter whole, on every rank."""
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}


def load_dcp_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Model and optimizer state from a DCP-format dict, whatever engine and world size saved it.

    Not strict: a parameter never stepped yet (frozen prototypes) has no optimizer state, and gets it at its
    first step as in the uninterrupted run; missing model keys have already failed in dcp.load."""
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=False))
