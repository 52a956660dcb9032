"""Activation checkpointing: keep fewer of the trunk's activations from forward to backward, and recompute them
in backward (`parallel.activation_checkpointing`).

A step's activations grow with the per-GPU batch and the crops' pixels, and dominate the memory of a wide trunk
long before its parameters do (SEER trained RegNetY-256GF with it on 32 GB V100s; RegNet-10B per stage). The
modes (docs/benchmarks.md measures each):

- `selective`: every residual or transformer block keeps the outputs of its convolutions, matrix products and
  attention, and recomputes the rest (BatchNorm, ReLU, GELU, LayerNorm, the residual sums) in backward: what is
  recomputed is elementwise and cheap (RN50-w2 on the CPU: 15% of the activations saved at no measurable cost),
  but torch matches the recomputed ops through a Python dispatch mode, a cost per op that shows on small trunks.
- `block`: each block keeps only its input and recomputes its whole forward in backward (one more forward of
  the trunk, about a third more compute).
- `stage`: each residual stage (ResNet `layerN`, RegNet `trunk_output.blockN`) keeps only its input: the least
  kept between forward and backward, the same recomputation as `block`, but a stage's activations are all live
  at once during its recomputation, which can make its peak higher than `block`'s (RN50-w2: its first stage's, at
  the crops' full resolution). Not for ViTs, whose blocks are their stages.

torch.utils.checkpoint, non-reentrant, recomputes with the random state and autocast of the forward, so the
recomputation is bitwise the forward where the forward's kernels are deterministic: on the CPU (tested); on a GPU
the recomputation runs the forward's kernels again (cuDNN's benchmark mode keeps its choice per shape, and the
shapes are the forward's), bitwise unless a kernel is itself nondeterministic (atomic accumulations;
torch.use_deterministic_algorithms names them), which a convolutional or transformer forward does not use. Not
yet run on a GPU. Gradients and parameters then equal the run without checkpointing bit for bit, with one exception:
`selective` under autocast with fp32 weights (DDP, ZeRO; not FSDP2 gathering bf16 weights) casts a unit's
weights once per crop resolution rather than once per step (_without_autocast_cache), and so sums a weight's
gradient over the resolutions in fp32 where the run without it sums it in bf16: equal up to bf16's rounding.

BatchNorm updates its running statistics in every training forward, so a recomputation would update them twice
a step. The recomputation keeps them: it restores them (and the batch counter) to their values at its start
(`running_statistics_kept`). SyncBatchNorm's collectives run again in the recomputation, on every rank alike.

The checkpointed function is the module's own `forward`, replaced on the instance as compile_units does: the
hooks an engine sets on the module (FSDP2's gathers) stay outside it, so FSDP2 gathers a unit before its
forward and again before its backward, where the recomputation runs; parameter names do not change (no wrapper
module, no prefix in checkpoints).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("none", "selective", "block", "stage")

# The outputs `selective` keeps: those of the ops whose recomputation would cost real compute. What is left to
# recompute is elementwise or a normalisation, memory-bound and cheap beside them.
_aten = torch.ops.aten
KEPT_OPS = frozenset({
    _aten.convolution.default, _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
    _aten._scaled_dot_product_flash_attention.default, _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default, _aten._scaled_dot_product_flash_attention_for_cpu.default,
})


def _keep_compute_outputs(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpointed_units(trunk: nn.Module, mode: str) -> list[nn.Module]:
    """The modules whose forward `mode` recomputes: the blocks of every stage (a ViT's blocks), or the stages."""
    if mode == "none":
        return []
    if mode not in MODES:
        raise ValueError(f"parallel.activation_checkpointing={mode!r}: choose one of {', '.join(MODES)}")
    blocks = getattr(trunk, "blocks", None)  # a ViT's
    if blocks is not None:
        if mode == "stage":
            raise ValueError("parallel.activation_checkpointing=stage: a ViT has no stages; use block")
        return list(blocks)
    stages = getattr(trunk, "stages", None)  # a RegNet's
    if stages is None:
        stages = [getattr(trunk, f"layer{i}") for i in range(1, 5)]  # a ResNet's
    if mode == "stage":
        return list(stages)
    return [block for stage in stages for block in stage]


@contextlib.contextmanager
def running_statistics_kept(module: nn.Module) -> Iterator[None]:
    """The BatchNorm running statistics and batch counters of `module` as they were on entering, on leaving
    (also on an early stop of the recomputation, which leaves by an exception). One copy of them for the
    while: a few kilobytes to megabytes."""
    buffers = [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
               for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    kept = [b.clone() for b in buffers]
    try:
        yield
    finally:
        if buffers:
            with torch.no_grad():
                torch._foreach_copy_(buffers, kept)


@contextlib.contextmanager
def _together(first: contextlib.AbstractContextManager, second: contextlib.AbstractContextManager) -> Iterator[None]:
    with first, second:
        yield


def _contexts(module: nn.Module, selective: bool) -> tuple[contextlib.AbstractContextManager,
                                                            contextlib.AbstractContextManager]:
    """checkpoint's context_fn: (the forward's context, the recomputation's), entered when each runs."""
    if not selective:
        return contextlib.nullcontext(), running_statistics_kept(module)
    forward, recompute = create_selective_checkpoint_contexts(_keep_compute_outputs)
    # the statistics are copied and restored outside the recomputation's dispatch mode, which would take the copies
    # for ops of the checkpointed region
    return forward, _together(running_statistics_kept(module), recompute)


def _without_autocast_cache(forward: Callable[..., Any]) -> Callable[..., Any]:
    """`forward` casting its weights for autocast itself, not taking casts autocast cached earlier in the step.

    Why: a selective recomputation must run the ops of its forward one for one (torch matches them by name and
    count). Autocast caches a weight's bf16 copy for the rest of the step, so a unit called once per crop
    resolution casts its weights in its first call only, while each recomputation, in an autocast of its own,
    casts them afresh: a cast the forward never ran, which torch refuses. Without the cache both cast alike;
    the cost is a cast of the unit's weights per resolution instead of one per step."""

    @functools.wraps(forward)
    def uncached(*args: Any, **kwargs: Any) -> Any:
        cached = torch.is_autocast_cache_enabled()
        torch.set_autocast_cache_enabled(False)
        try:
            return forward(*args, **kwargs)
        finally:
            torch.set_autocast_cache_enabled(cached)

    return uncached


def checkpoint_forward(module: nn.Module, selective: bool = False) -> None:
    """Make `module`'s forward keep only its inputs (selective: and its compute ops' outputs) for backward, and
    recompute the rest there. Without gradients (evaluation, kNN) it runs the plain forward."""
    forward: Callable[..., Any] = module.forward
    if selective:
        forward = _without_autocast_cache(forward)
    context_fn = functools.partial(_contexts, module, selective)

    @functools.wraps(forward)
    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

    module.forward = checkpointed  # type: ignore[method-assign]


def apply_activation_checkpointing(trunk: nn.Module, mode: str) -> list[nn.Module]:
    """Checkpoint the trunk's blocks or stages in place, as `mode` (parallel.activation_checkpointing) says;
    returns the modules checkpointed. Applied to the model before an engine wraps it: FSDP2's units are the
    stages or blocks themselves, and their hooks stay outside the recomputed forward.

    The training model only: a replaced forward is bound to its module, so a deep copy of a checkpointed module
    would run the original's. Evaluation builds its own trunk (build.build_model; eval/knn.py), never a copy of
    this one, as it does for compiled units."""
    units = checkpointed_units(trunk, mode)
    for unit in units:
        checkpoint_forward(unit, selective=mode == "selective")
    return units
