"""The checks of a run's data that need no process group and no torch: the global batch gives every rank a sample,
the training shards exist and hold at least one global batch, and the evaluation sets that kNN during
pretraining reads exist (found at the start rather than after the first epoch).

The launchers (`swav-scale pretrain --nproc`, `swav-scale submit`) run them once before starting any rank, so
a mistake is reported once, and in this order, so the first message names the first thing to fix; in a run,
rank 0 runs them again and hands the manifest to the other ranks (build.build_loader). This module imports no
torch: a launcher checks a run before starting its ranks without importing torchvision, the engines or DCP,
which take seconds (the ranks import them).
"""

from __future__ import annotations

from swav_scale.config import Config, check_world
from swav_scale.data.manifest import Manifest
from swav_scale.data.plan import epoch_steps
from swav_scale.data.sources import open_shard_set


def preflight(cfg: Config, world_size: int) -> Manifest:
    """The training set's manifest, after the checks above (each raises a SwavScaleError naming what to fix)."""
    check_world(cfg, world_size)
    manifest = open_shard_set(cfg.data.train_shards, cfg.data.train_manifest)
    epoch_steps(manifest, cfg.optim.batch_size)
    if cfg.eval.every_epochs > 0:
        # the labelled sets' reader decodes with torchvision: imported only for a run that evaluates
        from swav_scale.data.labelled import open_labelled, require_labels

        open_labelled(cfg.eval.test_split())
        if cfg.eval.train_shards:
            open_labelled(cfg.eval.train_shards)
        else:  # the bank is the training set: it needs labels too
            require_labels(cfg.data.train_shards, manifest)
    return manifest
