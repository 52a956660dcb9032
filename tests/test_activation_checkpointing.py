"""Activation checkpointing (engines/activation_checkpointing.py) in one process: every mode trains each trunk
family exactly as without it, recomputes what it says, and leaves BatchNorm's running statistics updated once.
On real ranks under DDP, FSDP2 and ZeRO: tests/test_engines.py."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import swav_scale.engines.activation_checkpointing as ac
from swav_scale.config import ConfigError, load_config
from swav_scale.models import build_swav_model

# (arch, width, crop sizes): small enough for a CPU, every kind of trunk
TRUNKS = [("resnet18", 0.25, (32, 32, 16)), ("regnety_400mf", None, (32, 32, 16)), ("vit_small", None, (32, 16))]


def train(arch: str, width: float | None, sizes: tuple[int, ...], mode: str, steps: int = 2) -> dict[str, torch.Tensor]:
    """Parameters and buffers after `steps` SGD steps on fixed crops (ViT drop path on: its random draws must be
    replayed in the recomputation)."""
    torch.manual_seed(0)
    model = build_swav_model(arch, width, False, 64, 16, 10)
    ac.apply_activation_checkpointing(model.trunk, mode)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        crops = [torch.randn(4, 3, s, s, generator=g) for s in sizes]
        z, scores = model(crops)
        (sum(s.square().mean() for s in scores) + sum(e.sum() for e in z)).backward()
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("arch", "width", "sizes"), TRUNKS, ids=[t[0] for t in TRUNKS])
def test_every_mode_trains_as_without_it_bit_for_bit(arch: str, width: float | None, sizes: tuple[int, ...]) -> None:
    reference = train(arch, width, sizes, "none")
    for mode in ("selective", "block") + (() if arch.startswith("vit") else ("stage",)):
        out = train(arch, width, sizes, mode)
        different = [k for k in reference if not torch.equal(reference[k], out[k])]
        assert not different, f"{mode}: {different[:5]}"


def test_without_keeping_them_the_recomputation_would_update_running_statistics_twice(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard is what keeps them: with it replaced by nothing, block checkpointing moves BatchNorm's running
    statistics and counters a second time per step."""
    reference = train("resnet18", 0.25, (32, 32, 16), "none")
    monkeypatch.setattr(ac, "running_statistics_kept", lambda module: contextlib.nullcontext())
    out = train("resnet18", 0.25, (32, 32, 16), "block")
    assert out["trunk.layer1.0.bn1.num_batches_tracked"] == 2 * reference["trunk.layer1.0.bn1.num_batches_tracked"]
    assert not torch.equal(out["trunk.layer1.0.bn1.running_mean"], reference["trunk.layer1.0.bn1.running_mean"])


class Convolutions(TorchDispatchMode):
    """Counts the convolutions computed (a selective recomputation takes the kept ones from its cache, unseen)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's signature)
        self.count += func is torch.ops.aten.convolution.default
        return func(*args, **(kwargs or {}))


def convolutions_run(model: nn.Module, crops: list[torch.Tensor], grad: bool = True) -> int:
    """How many convolutions the trunk computed in a forward and backward (its weights' and inputs' gradients
    are other ops)."""
    with Convolutions() as counter, torch.set_grad_enabled(grad):
        z, scores = model(crops)
        if grad:
            sum(s.sum() for s in scores).backward()
    return counter.count


@pytest.mark.parametrize(("mode", "recomputed"), [("none", 0), ("selective", 0), ("block", 1), ("stage", 1)])
def test_each_mode_recomputes_what_it_says(mode: str, recomputed: int) -> None:
    """block and stage compute every convolution of the stages again in backward; selective keeps their outputs
    and recomputes only what lies between them; the stem is never recomputed. Without gradients (evaluation) nothing
    is checkpointed."""
    model = build_swav_model("resnet18", 0.25, False, 32, 16, 10)
    plain = convolutions_run(model, [torch.randn(2, 3, 32, 32)])
    units = ac.apply_activation_checkpointing(model.trunk, mode)
    stem = 1
    assert convolutions_run(model, [torch.randn(2, 3, 32, 32)]) == plain + recomputed * (plain - stem)
    assert convolutions_run(model, [torch.randn(2, 3, 32, 32)], grad=False) == plain
    assert len(units) == {"none": 0, "selective": 8, "block": 8, "stage": 4}[mode]


def test_units_are_the_blocks_or_stages_of_each_trunk_family() -> None:
    regnet = build_swav_model("regnety_400mf", None, False, 32, 16, 10).trunk
    assert ac.checkpointed_units(regnet, "stage") == regnet.stages
    assert len(ac.checkpointed_units(regnet, "block")) == sum(len(s) for s in regnet.stages) == 16
    vit = build_swav_model("vit_small", None, False, 32, 16, 10).trunk
    assert ac.checkpointed_units(vit, "block") == list(vit.blocks)
    with pytest.raises(ValueError, match="no stages"):
        ac.checkpointed_units(vit, "stage")


def test_the_config_refuses_what_cannot_work_and_explains_off() -> None:
    with pytest.raises(ConfigError, match="a ViT's blocks are its only units"):
        load_config(None, ["data.train_shards=x", "model.arch=vit_small", "parallel.activation_checkpointing=stage"])
    with pytest.raises(ConfigError, match="torch.compile cannot trace the recomputed units"):
        load_config(None, ["data.train_shards=x", "parallel.compile=true", "parallel.activation_checkpointing=block"])
    with pytest.raises(ConfigError, match="YAML reads off, no, on and yes as booleans"):
        load_config(None, ["data.train_shards=x", "parallel.activation_checkpointing=off"])
    assert load_config(None, ["data.train_shards=x"]).parallel.activation_checkpointing == "none"
