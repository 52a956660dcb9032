"""Export: a checkpoint's backbone as one file that loads into torchvision / timm / swav_scale's constructors."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file

from swav_scale.build import build_model
from swav_scale.checkpoint.manager import Checkpointer
from swav_scale.checkpoint.states import TrainProgress
from swav_scale.config import load_config, to_yaml
from swav_scale.distributed import DistEnv
from swav_scale.engines.ddp import DDPEngine
from swav_scale.export import export_backbone
from swav_scale.models import build_trunk
from swav_scale.optim import build_optimizer


def _run_with_checkpoint(tmp_path: Path, *overrides: str) -> tuple[Path, torch.nn.Module]:
    """A run directory holding config.yaml and one checkpoint of a model whose weights are not the init."""
    cfg = load_config("configs/quickstart.yaml", [f"train.run_dir={tmp_path / 'run'}", *overrides])
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    torch.manual_seed(1)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # differs from any fresh initialisation
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)  # buffers are exported too
    env = DistEnv(0, 1, 0, 1, torch.device("cpu"))
    engine = DDPEngine(model, functools.partial(build_optimizer, cfg=cfg.optim), env, "fp32")
    Checkpointer(run_dir / "checkpoints", env).save(7, {"engine": engine, "progress": TrainProgress()}, {})
    return run_dir, model.trunk.eval()


def test_resnet50_loads_into_torchvision_with_one_line(tmp_path: Path) -> None:
    run_dir, trunk = _run_with_checkpoint(tmp_path, "model.arch=resnet50", "model.width=1.0",
                                          "model.small_stem=false", "model.num_prototypes=30")
    files = export_backbone(run_dir)
    assert [f.name for f in files] == ["backbone.safetensors", "backbone.pth"]
    x = torch.randn(2, 3, 64, 64)
    for f in files:
        sd = load_file(f) if f.suffix == ".safetensors" else torch.load(f)
        tv = torchvision.models.resnet50()
        missing, unexpected = tv.load_state_dict(sd, strict=False)
        assert missing == ["fc.weight", "fc.bias"] and unexpected == []
        tv.fc = torch.nn.Identity()
        assert torch.allclose(tv.eval()(x), trunk(x), atol=1e-5), f.name
    info = json.loads((run_dir / "export" / "step-00000007" / "export.json").read_text())
    assert info["step"] == 7 and info["out_dim"] == 2048 and info["parameters"] == pytest.approx(23.5e6, rel=0.01)
    assert info["files"]["backbone.pth"]["load"].startswith("torchvision.models.resnet50().load_state_dict(")


def test_vit_loads_into_timm_strictly(tmp_path: Path) -> None:
    run_dir, trunk = _run_with_checkpoint(tmp_path, "model.arch=vit_small", "model.width=null",
                                          "model.small_stem=false", "model.zero_init_residual=false",
                                          "model.num_prototypes=30", "model.hidden_dims=[64]")
    (f,) = export_backbone(run_dir, formats=("safetensors",))
    vit = timm.create_model("vit_small_patch16_224", num_classes=0, pretrained=False)
    vit.load_state_dict(load_file(f))
    x = torch.randn(2, 3, 224, 224)
    assert torch.allclose(vit.eval()(x), trunk(x), atol=1e-5)


def test_small_stem_resnet_loads_into_its_own_constructor(tmp_path: Path) -> None:
    run_dir, trunk = _run_with_checkpoint(tmp_path)  # the demo's ResNet-18, width 0.5, small stem
    out = tmp_path / "elsewhere"
    (f,) = export_backbone(run_dir, out=out, formats=("pth",))
    fresh = build_trunk("resnet18", width=0.5, small_stem=True)
    fresh.load_state_dict(torch.load(f))
    x = torch.randn(2, 3, 28, 28)
    assert torch.allclose(fresh.eval()(x), trunk(x), atol=1e-5)
    assert "swav_scale.models.build_trunk('resnet18', width=0.5" in json.loads(
        (out / "export.json").read_text())["files"]["backbone.pth"]["load"]


def test_a_regnet_loads_into_torchvision_by_the_line_export_json_gives(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The exported RegNetY loads into torchvision's RegNet, built from the arch's design parameters, by the very
    line export.json writes (evaluated here, beside the file), all but fc, and computes the trunk's features."""
    run_dir, trunk = _run_with_checkpoint(tmp_path, "model.arch=regnety_400mf", "model.width=null",
                                          "model.small_stem=false", "model.zero_init_residual=false",
                                          "model.num_prototypes=30", "model.hidden_dims=[64]")
    (f,) = export_backbone(run_dir, formats=("pth",))
    line = json.loads((f.parent / "export.json").read_text())["files"]["backbone.pth"]["load"]
    network, _, load = line.split("  #")[0].partition(".load_state_dict(")
    monkeypatch.chdir(f.parent)
    net = eval(network, {"torchvision": torchvision})  # noqa: S307 - the line export wrote
    result = eval("net.load_state_dict(" + load, {"net": net, "torch": torch})  # noqa: S307
    assert result.missing_keys == ["fc.weight", "fc.bias"] and result.unexpected_keys == []
    net.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(net.eval()(x), trunk(x), atol=1e-5)
