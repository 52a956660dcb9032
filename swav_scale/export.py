"""`swav-scale export RUN_DIR`: the pretrained backbone as one consolidated file that loads without swav_scale.

Whatever engine and number of ranks wrote the checkpoint (DDP, FSDP2 shards, DeepSpeed ZeRO partitions), the
trunk's weights are gathered into one state dict (eval.features.load_model_weights) and written as safetensors
and/or a .pth of plain tensors, beside an export.json saying what it is and how to load it:

* ResNet-50 / ResNet-18 at width 1 with the standard stem: torchvision's names, so
  `torchvision.models.resnet50().load_state_dict(sd, strict=False)` misses only `fc` (SwAV has no classifier);
* ViT-S/16, ViT-B/16: timm's names, so `timm.create_model("vit_small_patch16_224", num_classes=0)` loads it
  strictly;
* RegNetY (regnety_*, SEER's 128GF and 256GF among them): torchvision's names, so `torchvision.models.RegNet`
  with the arch's design parameters loads it, all but `fc`;
* wide ResNets (RN50w2/w4/w5) and small-stem variants: `swav_scale.models.build_trunk(arch, width, small_stem)`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from swav_scale.build import build_model
from swav_scale.checkpoint.layout import newest_checkpoint, read_meta
from swav_scale.config import Config
from swav_scale.eval.features import load_model_weights
from swav_scale.models.regnet import REGNETS
from swav_scale.run_dir import export_dir, load_run_config
from swav_scale.utils import atomic_write_bytes, atomic_write_text, sha256_file

FORMATS = ("safetensors", "pth")
TIMM_NAMES = {"vit_small": "vit_small_patch16_224", "vit_base": "vit_base_patch16_224"}


def how_to_load(cfg: Config, filename: str) -> str:
    """One line of Python that loads the exported file into a network outside swav_scale (or its own)."""
    m = cfg.model
    read = (f"safetensors.torch.load_file('{filename}')" if filename.endswith(".safetensors")
            else f"torch.load('{filename}')")
    if m.arch in TIMM_NAMES:
        return f"timm.create_model('{TIMM_NAMES[m.arch]}', num_classes=0).load_state_dict({read})"
    if m.arch in ("resnet18", "resnet50") and m.width in (None, 1.0) and not m.small_stem and m.maxpool:
        return f"torchvision.models.{m.arch}().load_state_dict({read}, strict=False)  # all but fc"
    if m.arch in REGNETS:
        d = REGNETS[m.arch]
        return (f"torchvision.models.RegNet(torchvision.models.regnet.BlockParams.from_init_params({d.depth}, "
                f"{d.w_0}, {d.w_a}, {d.w_m}, {d.group_width}, se_ratio={d.se_ratio})).load_state_dict({read}, "
                "strict=False)  # all but fc")
    return (f"swav_scale.models.build_trunk('{m.arch}', width={m.width}, small_stem={m.small_stem}, "
            f"maxpool={m.maxpool}).load_state_dict({read})")


def export_backbone(run_dir: str | Path, checkpoint: str | Path | None = None, out: str | Path | None = None,
                    formats: tuple[str, ...] = FORMATS) -> list[Path]:
    """Write the trunk of `checkpoint` (default: the run's newest complete one); returns the files written."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    checkpoint = Path(checkpoint) if checkpoint else newest_checkpoint(run_dir, required=True)
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ValueError(f"unknown export format {', '.join(bad)}; choose from {', '.join(FORMATS)}")
    model = build_model(cfg)
    load_model_weights(model, checkpoint)
    # plain contiguous tensors: safetensors refuses strided ones, and other code expects torchvision's layout
    weights = {k: v.detach().contiguous().clone() for k, v in model.trunk.state_dict().items()}
    step = read_meta(checkpoint)["step"]
    out = Path(out) if out else export_dir(run_dir, checkpoint.name)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        target = out / f"backbone.{fmt}"
        if fmt == "safetensors":
            from safetensors.torch import save

            data = save(weights, metadata={"arch": cfg.model.arch, "step": str(step), "source": str(checkpoint)})
        else:
            buf = io.BytesIO()
            torch.save(weights, buf)
            data = buf.getvalue()
        atomic_write_bytes(target, data)
        written.append(target)
    info = {
        "arch": cfg.model.arch, "width": cfg.model.width, "small_stem": cfg.model.small_stem,
        "maxpool": cfg.model.maxpool, "out_dim": int(model.trunk.out_dim),
        "parameters": sum(p.numel() for p in model.trunk.parameters()),
        "checkpoint": str(checkpoint), "step": step,
        "normalize": {"mean": list(cfg.crops.mean), "std": list(cfg.crops.std)},
        "files": {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p), "load": how_to_load(cfg, p.name)}
                  for p in written},
    }
    atomic_write_text(out / "export.json", json.dumps(info, indent=1))
    return written
