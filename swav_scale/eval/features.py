"""The encoders an evaluation compares, and their features: the one place that builds them.

An encoder maps a batch of normalised images to features: a run's trunk read from a checkpoint, the same network
at its seeded random initialisation, or the raw pixels. kNN (knn.py), the linear probe (linear.py), the demo and
the benchmarks all build them here and extract the features of the train and test splits here, so every
evaluation scores the same features of the same images. The model's weights are read from a checkpoint in one
process, whichever engine and number of ranks wrote it, for evaluation and for export alike.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from swav_scale.build import build_model
from swav_scale.checkpoint.layout import newest_checkpoint, own_files_dir
from swav_scale.config import Config
from swav_scale.data.device import normalize
from swav_scale.data.labelled import LabelledStream, Unit, open_labelled
from swav_scale.data.multicrop import EvalTransform
from swav_scale.distributed import all_gather_object, in_group, rank, world_size
from swav_scale.engines.base import autocast_dtype
from swav_scale.errors import SwavScaleError
from swav_scale.eval.precise_bn import calibration_batches, precise_batchnorms
from swav_scale.utils import console, progress_bar

Encoder = Callable[[Tensor], Tensor]  # normalised images (N, C, H, W) -> features (N, ...)

RANDOM_INIT = "random init"
RAW_PIXELS = "raw pixels"


class CheckpointMismatch(SwavScaleError, RuntimeError):
    """A checkpoint that lacks tensors of the model the config builds (written for another model config)."""


def load_model_weights(model: nn.Module, checkpoint: Path) -> None:
    """The SwAV model's weights from a `step-N/` checkpoint, in one process, whichever engine and number of
    ranks wrote it: DCP holds the whole model (DDP, FSDP) or the prototypes (DeepSpeed, whose trunk and head
    are in its own files under `engine/`)."""
    saved = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    target = model.state_dict()
    state = {"engine": {"model": {k: v for k, v in target.items() if f"engine.model.{k}" in saved}}}
    dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)  # every shard read here, in this one process
    weights = state["engine"]["model"]
    engine_files = own_files_dir(checkpoint, "engine")
    if engine_files.is_dir():
        # here, not at the top: only a DeepSpeed checkpoint has these files, and deepspeed is slow to import
        from swav_scale.engines.zero import read_fp32_weights

        weights |= read_fp32_weights(engine_files)
    missing = sorted(set(target) - set(weights))
    if missing:
        raise CheckpointMismatch(f"checkpoint {checkpoint} lacks {len(missing)} model tensors ({', '.join(missing[:3])}"
                           f"{', ...' if len(missing) > 3 else ''}); was it written for another model config?")
    model.load_state_dict(weights)


def load_trunk(cfg: Config, checkpoint: Path | None) -> nn.Module:
    """The trunk of a checkpoint (only the model's part is read), or a fresh one."""
    torch.manual_seed(cfg.train.seed)  # a random-init baseline is the very network training started from
    model = build_model(cfg)
    if checkpoint is not None:
        load_model_weights(model, checkpoint)
    return model.trunk.eval()


def raw_pixels(x: Tensor) -> Tensor:
    """The baseline encoder: the (normalised) image itself, flattened."""
    return x.flatten(1)


def build_encoders(cfg: Config, device: torch.device | str, trunks: dict[str, Path | None],
                   pixels: str | None = None) -> dict[str, Encoder]:
    """The encoders an evaluation compares, in the order given: each named trunk on `device`, that of its
    checkpoint or, for None, the network as training started it; then the raw pixels, under the name
    `pixels` when one is given."""
    encoders: dict[str, Encoder] = {name: load_trunk(cfg, checkpoint).to(device)
                                    for name, checkpoint in trunks.items()}
    if pixels:
        encoders[pixels] = raw_pixels
    return encoders


def run_encoders(cfg: Config, run_dir: Path, device: torch.device | str, checkpoint: str | Path | None = None,
                 random_init: bool = False, baselines: bool = False) -> tuple[dict[str, Encoder], Path | None]:
    """What `swav-scale knn` and `linear` compare: the trunk of `checkpoint` (default: the run's newest) named
    after its step directory, unless `random_init` asks for the untrained network instead; then, with
    `baselines`, the random-init network and the raw pixels. Returns the encoders and the checkpoint read
    (None for `random_init`)."""
    trunks: dict[str, Path | None] = {}
    read = None
    if not random_init:
        read = Path(checkpoint) if checkpoint else newest_checkpoint(run_dir, required=True)
        trunks[f"SwAV ({read.name})"] = read
    if random_init or baselines:
        trunks[RANDOM_INIT] = None
    return build_encoders(cfg, device, trunks, RAW_PIXELS if baselines else None), read


@torch.no_grad()
def extract_features(
    encoders: dict[str, Encoder],
    units: list[Unit],
    transform: Callable[[Tensor], Tensor],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int = 256,
    num_workers: int = 2,
    device: torch.device | str = "cpu",
    description: str = "features",
    dtype: torch.dtype | None = None,
    show_progress: bool = True,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> tuple[dict[str, Tensor], Tensor]:
    """({encoder name: L2-normalised features (N, D)}, labels (N,)) for every image of `units` (a rank's part
    of a LabelledImages set, or all of it), on `device`: the kNN scores them there.

    Every encoder sees the same decoded batch, so the images are read and decoded once however many encoders
    (the trained network and its baselines) are compared. `dtype` runs the encoders under autocast (bf16 for a
    network trained in bf16: the features it was trained to produce, at up to twice the speed); `memory_format`
    lays the images out for the convolutions (channels-last: oneDNN's fast kernels; the features are equal to
    float rounding)."""
    device = torch.device(device)
    workers = min(num_workers, len(units))
    loader = DataLoader(LabelledStream(units, transform, batch_size), batch_size=None, num_workers=workers,
                        pin_memory=device.type == "cuda")  # pinned: the copies below do not hold the host up
    feats: dict[str, list[Tensor]] = {name: [] for name in encoders}
    labels = []
    bar = progress_bar(description, sum(u.count for u in units)) if show_progress else nullcontext(lambda n: None)
    with bar as advance:
        for x, y in loader:
            x = normalize(x.to(device, non_blocking=True), mean, std).contiguous(memory_format=memory_format)
            for name, encode in encoders.items():
                with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
                    out = encode(x)
                feats[name].append(F.normalize(out.float(), dim=1))
            labels.append(y.to(device, non_blocking=True))  # from the pinned batch, as the images
            advance(len(y))
    empty = torch.zeros(0, device=device)
    return ({name: torch.cat(f) if f else empty for name, f in feats.items()},
            torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device))


def _same_width_everywhere(features: dict[str, Tensor]) -> dict[str, Tensor]:
    """A rank that read no image of a split (fewer shards than ranks) has no feature width of its own; it takes
    the others', so that its empty part can still be gathered and scored (collective)."""
    widths = all_gather_object({name: f.shape[1:] for name, f in features.items() if len(f)})
    return {name: f if len(f) else f.reshape(0, *next(w[name] for w in widths if name in w))
            for name, f in features.items()}


Split = tuple[dict[str, Tensor], Tensor]  # ({encoder name: features}, labels) of this rank's part of a split


def split_features(
    cfg: Config,
    encoders: dict[str, Encoder],
    device: torch.device | str = "cpu",
    num_workers: int = 2,
    show_progress: bool = True,
) -> tuple[Split, Split]:
    """Features of the train split (eval.train_shards, default data.train_shards) and of the test split
    (eval.test_shards), each a shard set or an ImageFolder. Under torch.distributed, of this rank's part."""
    e = cfg.eval
    bank_set = (open_labelled(e.train_shards) if e.train_shards
                else open_labelled(cfg.data.train_shards, cfg.data.train_manifest))
    query_set = open_labelled(e.test_split())
    this_rank, world = rank(), world_size()
    transform = EvalTransform(e.resize, e.crop)
    mean, std = tuple(cfg.crops.mean), tuple(cfg.crops.std)
    dtype = autocast_dtype(cfg.parallel.precision, torch.device(device))  # the precision the network trained in
    layout = torch.channels_last if cfg.parallel.channels_last else torch.contiguous_format  # as it trained
    networks = {name: enc for name, enc in encoders.items() if isinstance(enc, nn.Module)}
    if e.precise_bn_images and networks:  # the same images and batches on any number of ranks (precise_bn.py)
        if e.precise_bn_images > bank_set.total and this_rank == 0:  # the tables will name the configured number
            console.print(f"[yellow]warning:[/] eval.precise_bn_images={e.precise_bn_images}, but the train split "
                          f"holds {bank_set.total} images: BatchNorm statistics come from all {bank_set.total}",
                          highlight=False)
        batches = calibration_batches(bank_set.units, transform, mean, std, e.precise_bn_images, e.batch_size,
                                      device, layout)
        encoders = {**encoders, **precise_batchnorms(networks, batches, dtype)}
    bank, bank_y = extract_features(encoders, bank_set.part(this_rank, world), transform, mean, std,
                                    e.batch_size, num_workers, device, "bank (train split)", dtype, show_progress,
                                    layout)
    queries, query_y = extract_features(encoders, query_set.part(this_rank, world), transform, mean, std,
                                        e.batch_size, num_workers, device, "queries (test split)", dtype,
                                        show_progress, layout)
    if in_group():
        bank, queries = _same_width_everywhere(bank), _same_width_everywhere(queries)
    return (bank, bank_y), (queries, query_y)
