"""Trunks: torchvision compatibility, SwAV widths, small stem, the multi-crop forward."""

from __future__ import annotations

import pytest
import torch
import torchvision

from swav_scale.build import build_model
from swav_scale.config import ConfigError, load_config
from swav_scale.models import ProjectionHead, build_swav_model, build_trunk
from swav_scale.models.regnet import REGNETS


def n_params(m: torch.nn.Module) -> float:
    return sum(p.numel() for p in m.parameters()) / 1e6


@pytest.mark.parametrize("arch,millions", [("resnet50", 23.5), ("resnet50w2", 93.9), ("resnet50w4", 375.4),
                                           ("resnet50w5", 586.5)])
def test_trunk_sizes_match_swav(arch: str, millions: float) -> None:
    with torch.device("meta"):  # count without allocating 2 GB of weights
        trunk = build_trunk(arch)
    assert n_params(trunk) == pytest.approx(millions, abs=0.1)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_width_one_loads_into_torchvision(arch: str) -> None:
    trunk = build_trunk(arch)
    tv = getattr(torchvision.models, arch)()
    missing, unexpected = tv.load_state_dict(trunk.state_dict(), strict=False)
    assert missing == ["fc.weight", "fc.bias"] and unexpected == []
    tv.fc = torch.nn.Identity()
    tv.eval(), trunk.eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(tv(x), trunk(x), atol=1e-5)


def test_wide_resnet_widens_every_stage() -> None:
    with torch.device("meta"):
        w2 = build_trunk("resnet50w2")
    assert w2.conv1.out_channels == 128 and w2.out_dim == 4096
    assert w2.layer1[0].conv2.out_channels == 128 and w2.layer4[0].conv3.out_channels == 4096


def test_small_stem_keeps_resolution_for_small_images() -> None:
    trunk = build_trunk("resnet18", width=0.25, small_stem=True)
    assert trunk.conv1.kernel_size == (3, 3) and trunk.conv1.stride == (1, 1)
    assert trunk(torch.randn(2, 3, 28, 28)).shape == (2, 128)
    # without the stem max-pool every stage keeps twice the resolution: layer4 sees 4x4 instead of 2x2
    no_pool = build_trunk("resnet18", width=0.25, small_stem=True, maxpool=False)
    x = torch.randn(2, 3, 28, 28)
    stem = no_pool.relu(no_pool.bn1(no_pool.conv1(x)))
    assert no_pool.layer3(no_pool.layer2(no_pool.layer1(no_pool.maxpool(stem)))).shape[-1] == 7
    assert no_pool(x).shape == (2, 128)
    with pytest.raises(ConfigError, match="model.width=0.3 must make 64\\*width a positive whole number"):
        load_config(None, ["data.train_shards=/x", "model.arch=resnet18", "model.width=0.3"])


def test_multicrop_forward_groups_resolutions() -> None:
    model = build_swav_model("resnet18", 0.25, True, [64], 32, 10)
    crops = [torch.randn(4, 3, 28, 28)] * 2 + [torch.randn(4, 3, 12, 12)] * 3
    z, scores = model(crops)
    assert len(z) == len(scores) == 5
    assert all(t.shape == (4, 32) for t in z) and all(s.shape == (4, 10) for s in scores)
    assert torch.allclose(torch.stack(z).norm(dim=-1), torch.ones(5, 4), atol=1e-5)


def test_head_and_prototypes_stay_float32_under_bf16_autocast() -> None:
    model = build_swav_model("resnet18", 0.25, True, [64], 32, 10).to(memory_format=torch.channels_last)
    crops = [torch.randn(4, 3, 28, 28)] * 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.trunk(crops[0])
        z, scores = model(crops)
    assert features.dtype == torch.bfloat16, "the trunk runs in bf16"
    assert all(t.dtype == torch.float32 for t in z + scores)
    assert torch.allclose(torch.stack(z).norm(dim=-1), torch.ones(2, 4), atol=1e-6)


def test_a_list_of_resolutions_runs_each_stage_once_with_the_same_arithmetic() -> None:
    """The trunk takes one batch per crop resolution in one call: each stage is called once (an FSDP unit is
    then gathered once), and every batch gets what it would get alone, BatchNorm statistics included."""
    torch.manual_seed(0)
    together = build_trunk("resnet18", width=0.25, small_stem=True)
    alone = build_trunk("resnet18", width=0.25, small_stem=True)
    alone.load_state_dict(together.state_dict())
    calls = {name: 0 for name in ("layer1", "layer2", "layer3", "layer4")}
    for name in calls:
        def count(module: torch.nn.Module, args: tuple, name: str = name) -> None:
            calls[name] += 1
        getattr(together, name).register_forward_pre_hook(count)
    batches = [torch.randn(4, 3, 28, 28), torch.randn(6, 3, 12, 12)]
    features = together(batches)
    assert calls == {"layer1": 1, "layer2": 1, "layer3": 1, "layer4": 1}
    for got, batch in zip(features, batches, strict=True):
        assert torch.equal(got, alone(batch))
    for (name, a), b in zip(together.state_dict().items(), alone.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{name} differs (running statistics are updated per batch, in order)"


def test_a_vit_takes_a_list_of_resolutions_too() -> None:
    vit = build_trunk("vit_small", drop_path_rate=0.0).eval()
    batches = [torch.randn(2, 3, 32, 32), torch.randn(1, 3, 16, 16)]
    features = vit(batches)
    assert [f.shape for f in features] == [(2, 384), (1, 384)]
    assert torch.allclose(features[1], vit(batches[1]), atol=1e-6)


@pytest.mark.parametrize("arch,millions", [("regnety_400mf", 3.9), ("regnety_16gf", 80.6), ("regnety_128gf", 637.4),
                                           ("regnety_256gf", 1272.2), ("regnety_10b", 9323.9)])
def test_regnet_trunk_sizes(arch: str, millions: float) -> None:
    """torchvision's RegNetY-400MF, -16GF and -128GF less their classifiers (4.3M, 83.6M, 644.8M with it), and
    SEER's RegNetY-256GF (1.3B with its SwAV head) and 10B RegNetY: built on the meta device, as a plan builds
    them, without allocating their weights."""
    with torch.device("meta"):
        trunk = build_trunk(arch)
    assert n_params(trunk) == pytest.approx(millions, abs=0.1)


@pytest.mark.parametrize("arch,widths", [("regnety_256gf", [746, 1492, 4103, 10444]),
                                         ("regnety_10b", [2020, 4040, 11110, 28280])])
def test_seer_regnets_have_the_stage_widths_of_vissls_configs(arch: str, widths: list[int]) -> None:
    """The widths vissl's SEER configs give these trunks' stages: the SwAV head's input (dims[0], 10444 and 28280)
    and the linear probes' inputs after the third and fourth stage (4103 and 10444, 11110 and 28280)."""
    params = REGNETS[arch].block_params()
    assert params.widths == widths and params.depths == [2, 7, 17, 1]
    assert set(params.group_widths) == {REGNETS[arch].group_width} and set(params.bottleneck_multipliers) == {1.0}
    assert REGNETS[arch].se_ratio == 0.25  # a RegNetY: vissl's default use_se, which SEER's configs keep


@pytest.mark.parametrize("arch,trunk_dim,billions", [("regnety_256gf", 10444, 1.431), ("regnety_10b", 28280, 9.629)])
def test_seer_swav_models_with_seer_heads_build_on_the_meta_device(arch: str, trunk_dim: int,
                                                                   billions: float) -> None:
    """SEER's SwAV model: the trunk, the head [trunk, 8192, 8192, 256] without BatchNorm, 16000 prototypes (vissl's
    seer/models/regnet10B.yaml and swav/heads/d10444_d8192_d8192_d256_proto16k.yaml), about 10B parameters
    for the 10B and 1.4B for the 256GF, counted on the meta device."""
    with torch.device("meta"):
        model = build_swav_model(arch, None, False, [8192, 8192], 256, 16000, head_batchnorm=False)
    assert model.trunk.out_dim == trunk_dim
    shapes = {name: tuple(p.shape) for name, p in model.head.named_parameters()}
    assert shapes == {"mlp.0.weight": (8192, trunk_dim), "mlp.0.bias": (8192,), "mlp.2.weight": (8192, 8192),
                      "mlp.2.bias": (8192,), "mlp.4.weight": (256, 8192), "mlp.4.bias": (256,)}
    assert tuple(model.prototypes.weight.shape) == (16000, 256)
    assert n_params(model) / 1e3 == pytest.approx(billions, abs=0.001)
    assert all(p.is_meta for p in model.parameters())


def test_a_head_without_batchnorm_has_linear_relu_layers_under_positional_names() -> None:
    head = ProjectionHead(16, [12, 10], 8, batchnorm=False)
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert list(head.state_dict()) == ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight",
                                       "mlp.4.bias"]
    assert [(m.in_features, m.out_features) for m in head.mlp[::2]] == [(16, 12), (12, 10), (10, 8)]
    assert head(torch.randn(5, 16)).shape == (5, 8)
    with_bn = ProjectionHead(16, [12, 10], 8)
    assert [type(m).__name__ for m in with_bn.mlp] == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear"]
    assert with_bn(torch.randn(5, 16)).shape == (5, 8)


def test_the_default_head_keeps_the_names_checkpoints_hold() -> None:
    """SwAV's head [2048] (here narrower): Linear mlp.0, BatchNorm mlp.1, Linear mlp.3, as before hidden_dims
    became a list, so checkpoints saved then still load; [] is a single Linear mlp.0."""
    model = build_model(load_config(None, ["data.train_shards=x", "model.arch=resnet18", "model.width=0.125",
                                           "model.hidden_dims=[32]", "model.embed_dim=16"]))
    assert list(model.head.state_dict()) == [
        "mlp.0.weight", "mlp.0.bias", "mlp.1.weight", "mlp.1.bias", "mlp.1.running_mean", "mlp.1.running_var",
        "mlp.1.num_batches_tracked", "mlp.3.weight", "mlp.3.bias"]
    assert isinstance(model.head.mlp[1], torch.nn.BatchNorm1d) and model.head.mlp[3].out_features == 16
    assert list(ProjectionHead(16, [], 8).state_dict()) == ["mlp.0.weight", "mlp.0.bias"]
    seer = build_model(load_config(None, ["data.train_shards=x", "model.arch=resnet18", "model.width=0.125",
                                          "model.hidden_dims=[32,24]", "model.head_batchnorm=false"]))
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in seer.head.modules())
    assert [m.out_features for m in seer.head.mlp if isinstance(m, torch.nn.Linear)] == [32, 24, 128]


def test_a_regnet_trunk_loads_into_torchvisions_regnet_and_computes_the_same_features() -> None:
    trunk = build_trunk("regnety_400mf")
    tv = torchvision.models.regnet_y_400mf()
    missing, unexpected = tv.load_state_dict(trunk.state_dict(), strict=False)
    assert missing == ["fc.weight", "fc.bias"] and unexpected == []
    tv.fc = torch.nn.Identity()
    tv.eval(), trunk.eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(tv(x), trunk(x)) and trunk.out_dim == 440


def test_a_regnet_runs_each_stage_once_over_a_list_of_resolutions() -> None:
    torch.manual_seed(0)
    together = build_trunk("regnety_400mf")
    alone = build_trunk("regnety_400mf")
    alone.load_state_dict(together.state_dict())
    calls = {name: 0 for name in ("block1", "block2", "block3", "block4")}
    for name in calls:
        def count(module: torch.nn.Module, args: tuple, name: str = name) -> None:
            calls[name] += 1
        getattr(together.trunk_output, name).register_forward_pre_hook(count)
    batches = [torch.randn(4, 3, 64, 64), torch.randn(6, 3, 32, 32)]
    features = together(batches)
    assert calls == {"block1": 1, "block2": 1, "block3": 1, "block4": 1}
    for got, batch in zip(features, batches, strict=True):
        assert torch.equal(got, alone(batch))


def test_resnet_keys_are_refused_for_a_regnet() -> None:
    with pytest.raises(ConfigError, match=r"model.width=2.0 does not apply to model.arch=regnety_400mf \(a RegNet's"):
        load_config(None, ["data.train_shards=x", "model.arch=regnety_400mf", "model.width=2"])
