"""Typed config: shipped files load, typos and bad values are refused with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from swav_scale.config import ConfigError, check_queue, check_world, load_config, to_yaml, from_yaml_text
from helpers import REPO


@pytest.mark.parametrize("name", ["quickstart", "rn50_in1k_100ep", "rn50_in1k_800ep"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(REPO / "configs" / f"{name}.yaml", ["data.train_shards=/tmp/x"])
    assert from_yaml_text(to_yaml(cfg)) == cfg


def test_paper_recipe_values() -> None:
    cfg = load_config(REPO / "configs" / "rn50_in1k_800ep.yaml", ["data.train_shards=/x"])
    assert (cfg.crops.sizes, cfg.crops.counts) == ([224, 96], [2, 6])
    assert (cfg.optim.batch_size, cfg.optim.base_lr, cfg.optim.final_lr) == (4096, 4.8, 0.0048)
    assert (cfg.optim.warmup_epochs, cfg.optim.start_warmup_lr, cfg.optim.weight_decay) == (10, 0.3, 1e-6)
    assert (cfg.swav.epsilon, cfg.swav.temperature, cfg.model.num_prototypes) == (0.05, 0.1, 3000)
    assert (cfg.swav.freeze_prototypes_iters, cfg.optim.epochs) == (313, 800)


def test_misspelled_key_names_the_closest_valid_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'optim.base_lrr': did you mean 'optim.base_lr'"):
        load_config(REPO / "configs" / "quickstart.yaml", ["optim.base_lrr=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_protoypes: 10\n")
    with pytest.raises(ConfigError, match=rf"{bad}:\n  unknown key 'model.num_protoypes': did you mean "
                                          r"'model.num_prototypes'"):
        load_config(bad)


def test_wrong_type_and_missing_values_name_the_key() -> None:
    with pytest.raises(ConfigError, match="key 'optim.epochs'"):
        load_config(None, ["data.train_shards=/x", "optim.epochs=ten"])
    with pytest.raises(ConfigError, match="data.train_shards"):
        load_config(REPO / "configs" / "rn50_in1k_100ep.yaml")
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, ["optim.epochs"])
    with pytest.raises(ConfigError, match="crops.counts has 1 entries but crops.sizes has 2"):
        load_config(None, ["data.train_shards=/x", "crops.counts=[2]"])


def test_world_size_checks() -> None:
    cfg = load_config(None, ["data.train_shards=/x", "optim.batch_size=96", "swav.queue_length=300"])
    with pytest.raises(ConfigError, match=r"swav.queue_length=300 is not a multiple of the global batch "
                                          r"optim.batch_size=96; use e.g. 288"):
        check_queue(cfg)
    cfg.swav.queue_length = 384
    check_queue(cfg)
    assert check_world(cfg, 3) == 32
    with pytest.raises(ConfigError, match="does not split evenly over 5 ranks"):
        check_world(cfg, 5)
    cfg.train.sync_batchnorm_group = 2
    with pytest.raises(ConfigError, match="train.sync_batchnorm_group=2 does not divide the 3 ranks"):
        check_world(cfg, 3)
    assert check_world(cfg, 4) == 24


# (overrides, what the refusal says): each is refused with a message naming the key and what to do
REFUSED = [
    (["train.engine=deepspeed"], r"optim.name=lars with train.engine=deepspeed: .* \(DeepSpeed issue #490\)"),
    (["train.engine=fsdp2"], "train.engine='fsdp2': choose one of ddp, fsdp, deepspeed"),
    (["train.zero_stage=4"], "train.zero_stage=4"),
    (["swav.sinkhorn_iterations=0"], "swav.sinkhorn_iterations=0: Sinkhorn needs at least 1"),
    (["swav.epsilon=0"], "swav.epsilon=0.0 must be positive"),
    (["train.zero_bucket_elements=0"], "train.zero_bucket_elements=0: a bucket holds at least one element"),
    (["train.engine=deepspeed", "optim.name=adamw", "train.zero_stage=3", "train.compile=true"],
     "train.compile=true with ZeRO-3: DeepSpeed gathers"),
    (["train.sync_batchnorm_group=-1"], "train.sync_batchnorm_group=-1: give the ranks per group"),
    (["optim.name=lamb"], "optim.name='lamb'"),
    (["eval.precise_bn_images=-1"], "eval.precise_bn_images=-1: give the number of training images"),
    (["train.process_group_timeout_s=0"], "train.process_group_timeout_s=0: give the seconds a collective may wait"),
]


def test_engine_and_optimizer_choices_are_checked() -> None:
    base = ["data.train_shards=x"]
    for overrides, message in REFUSED:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [*base, *overrides])
    cfg = load_config(None, [*base, "train.engine=deepspeed", "optim.name=adamw", "train.zero_stage=3"])
    assert (cfg.train.engine, cfg.train.zero_stage, cfg.optim.name) == ("deepspeed", 3, "adamw")
