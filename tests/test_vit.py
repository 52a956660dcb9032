"""ViT trunks: timm's ViT-S/16 and ViT-B/16 under SwAV's multi-crop, the option checks, the ViT and wide-ResNet
configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed.checkpoint as dcp

from swav_scale.build import build_model
from swav_scale.config import Arch, ConfigError, check_world, load_config
from swav_scale.eval.features import load_trunk
from swav_scale.models import ARCHS, ViTTrunk, build_swav_model, build_trunk
from helpers import REPO
from runs import TINY_VIT, pretrain


def n_params(m: torch.nn.Module) -> float:
    return sum(p.numel() for p in m.parameters()) / 1e6


@pytest.fixture(scope="module")
def vit_s() -> ViTTrunk:
    torch.manual_seed(0)
    return build_trunk("vit_small").eval()


@pytest.mark.parametrize("arch,timm_name,millions", [("vit_small", "vit_small_patch16_224", 21.7),
                                                     ("vit_base", "vit_base_patch16_224", 85.8)])
def test_trunk_sizes_match_timm(arch: str, timm_name: str, millions: float) -> None:
    with torch.device("meta"):  # count without allocating the weights
        trunk = build_trunk(arch)
        reference = timm.create_model(timm_name, pretrained=False, num_classes=0)
    assert n_params(trunk) == n_params(reference) == pytest.approx(millions, abs=0.05)
    assert trunk.out_dim == reference.num_features
    assert isinstance(trunk.blocks, torch.nn.Sequential) and len(trunk.blocks) == 12


def test_one_trunk_takes_every_crop_size_and_equals_timm(vit_s: ViTTrunk) -> None:
    reference = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True)
    assert reference.load_state_dict(vit_s.state_dict()).missing_keys == []  # timm's own key names
    reference.eval()
    with torch.no_grad():
        for px in (32, 64):
            x = torch.randn(2, 3, px, px)
            features = vit_s(x)
            assert features.shape == (2, vit_s.out_dim) == (2, 384)
            assert torch.allclose(features, reference(x), atol=1e-5)
        with pytest.raises(ValueError, match="multiples of the patch size 16"):
            vit_s(torch.randn(1, 3, 40, 40))  # timm alone would silently crop it to 32 px


def test_drop_path_rate_rises_to_the_given_value() -> None:
    with torch.device("meta"):
        default, custom = build_trunk("vit_small"), build_trunk("vit_base", drop_path_rate=0.2)
    assert default.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)  # DINO's default
    assert custom.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    assert custom.blocks[0].drop_path1.drop_prob == 0.0  # linear from 0 at the first block


def test_swav_model_with_vit_trunk_takes_multicrop() -> None:
    torch.manual_seed(0)
    model = build_swav_model("vit_small", None, False, [64], 32, 10)
    crops = [torch.randn(2, 3, 32, 32)] * 2 + [torch.randn(2, 3, 16, 16)] * 2  # 2 global + 2 local
    z, scores = model(crops)
    assert len(z) == len(scores) == 4
    assert all(t.shape == (2, 32) for t in z) and all(s.shape == (2, 10) for s in scores)
    assert torch.allclose(torch.stack(z).norm(dim=-1), torch.ones(4, 2), atol=1e-5)


@pytest.mark.parametrize("option,pattern", [({"width": 2.0}, "model.width=2.0"),
                                            ({"small_stem": True}, "model.small_stem=True"),
                                            ({"maxpool": False}, "model.maxpool=False"),
                                            ({"zero_init_residual": True}, "model.zero_init_residual=True")])
def test_resnet_options_are_refused_for_a_vit(option: dict, pattern: str) -> None:
    key, value = next(iter(option.items()))
    with pytest.raises(ConfigError, match=pattern + ".*model.arch=vit_base"):
        load_config(None, ["data.train_shards=/x", "model.arch=vit_base", f"model.{key}={value}"])


def test_unknown_arch_lists_resnets_and_vits() -> None:
    with pytest.raises(ValueError, match="resnet50w5, vit_small, vit_base"):
        build_trunk("vit_large")
    with pytest.raises(ConfigError, match=r"key 'model.arch'.*resnet50w5, vit_small, vit_base"):
        load_config(None, ["data.train_shards=/x", "model.arch=vit_large"])
    with pytest.raises(ConfigError, match="model.drop_path_rate applies to ViTs only"):
        load_config(None, ["data.train_shards=/x", "model.arch=resnet18", "model.drop_path_rate=0.1"])
    assert set(Arch) == set(ARCHS)  # the config's choices are the trunks models/ builds


NEW_CONFIGS = {
    # name: (arch, global batch, optimizer, counts, queue, epochs)
    "rn50w2_in1k_400ep": ("resnet50w2", 4096, "lars", [2, 4], 0, 400),
    "rn50w4_in1k_400ep": ("resnet50w4", 2560, "lars", [2, 4], 2560, 400),
    "rn50w5_in1k_400ep": ("resnet50w5", 1536, "lars", [2, 4], 1536, 400),
    "vit_s16_in1k_300ep": ("vit_small", 1024, "adamw", [2, 6], 2048, 300),
    "vit_b16_in1k_300ep": ("vit_base", 1024, "adamw", [2, 6], 2048, 300),
}


@pytest.mark.parametrize("name", NEW_CONFIGS)
def test_new_configs_load_and_split(name: str) -> None:
    cfg = load_config(REPO / "configs" / f"{name}.yaml", ["data.train_shards=/tmp/x"])
    arch, batch, optimizer, counts, queue, epochs = NEW_CONFIGS[name]
    assert (cfg.model.arch, cfg.optim.batch_size, cfg.optim.name) == (arch, batch, optimizer)
    assert cfg.parallel.engine == "fsdp"
    assert (cfg.crops.counts, cfg.swav.queue_length, cfg.optim.epochs) == (counts, queue, epochs)
    check_world(cfg, 8)  # the configs' world: a node
    with torch.device("meta"):  # the config's model builds (ViT configs must not set the ResNet options)
        model = build_model(cfg)
    assert model.head.mlp[0].in_features == model.trunk.out_dim


def test_wide_resnet_recipes_from_the_swav_scripts() -> None:
    w4 = load_config(REPO / "configs" / "rn50w4_in1k_400ep.yaml", ["data.train_shards=/x"])
    assert (w4.crops.min_scale, w4.swav.queue_start_epoch, w4.model.hidden_dims) == ([0.08, 0.08], 0, [8192])
    w5 = load_config(REPO / "configs" / "rn50w5_in1k_400ep.yaml", ["data.train_shards=/x"])
    assert (w5.optim.final_lr, w5.optim.start_warmup_lr, w5.model.hidden_dims) == (0.0, 0.1875, [10240])
    vit = load_config(REPO / "configs" / "vit_s16_in1k_300ep.yaml", ["data.train_shards=/x"])
    assert (vit.optim.base_lr, vit.optim.weight_decay, vit.optim.final_lr) == (0.0005 * 1024 / 256, 0.04, 1e-6)


def test_knn_load_trunk_reads_a_vit_checkpoint(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs" / "vit_s16_in1k_300ep.yaml", ["data.train_shards=/x"])
    trained = build_model(cfg)
    with torch.no_grad():
        trained.trunk.pos_embed.add_(1.0)  # differs from the seeded fresh network load_trunk would build
    dcp.save({"engine": {"model": trained.state_dict()}}, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    trunk = load_trunk(cfg, tmp_path / "ckpt")
    assert isinstance(trunk, ViTTrunk) and not trunk.training
    assert all(torch.equal(a, b) for a, b in zip(trunk.state_dict().values(), trained.trunk.state_dict().values()))


@pytest.mark.slow
def test_vit_pretrain_evaluates_knn_during_training_on_two_ranks(fmnist_test_shards: Path, tmp_path: Path) -> None:
    """A ViT's drop-path buffers are non-persistent (no state-dict key): the kNN evaluation rebuilds the trunk
    from the engine's parameters and the state dict's buffers only, and logs its figure after the epoch."""
    run_dir = tmp_path / "vit"
    pretrain(fmnist_test_shards, run_dir, *TINY_VIT, "optim.name=adamw", "optim.epochs=1", "optim.base_lr=0.001",
             "optim.final_lr=1e-5", "optim.start_warmup_lr=0.0", "swav.queue_length=0", "checkpoint.every_steps=100",
             "parallel.engine=fsdp", "eval.every_epochs=1", f"eval.test_shards={fmnist_test_shards}",
             "eval.resize=32", "eval.crop=32")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    knn = [line for line in lines if "knn_top1" in line]
    assert [line["epoch"] for line in knn] == [0]
    assert 10 < knn[0]["knn_top1"] <= 100  # ten classes: above chance
