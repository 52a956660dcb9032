"""Typed config: shipped files load, typos and bad values are refused with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from swav_scale.config import ConfigError, EngineKind, check_world, from_yaml_text, load_config, rank_batch, to_yaml
from helpers import REPO


SHIPPED = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))


def test_the_shipped_configs_are_all_listed() -> None:
    assert {"quickstart", "rn50_in1k_800ep", "seer_regnety256gf_1b", "seer_regnety10b"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(REPO / "configs" / f"{name}.yaml", ["data.train_shards=/tmp/x"])
    assert from_yaml_text(to_yaml(cfg)) == cfg


@pytest.mark.parametrize(("name", "world"), [("seer_regnety256gf_1b", 512), ("seer_regnety10b", 496)])
def test_seer_configs_fit_their_world(name: str, world: int) -> None:
    """Each SEER config passes the world-size checks on the ranks its slurm section asks for (vissl's GPUs)."""
    cfg = load_config(REPO / "configs" / f"{name}.yaml", ["data.train_shards=/x"])
    assert cfg.slurm.nodes * cfg.slurm.ranks_per_node == world
    check_world(cfg, world)


def test_seer_256gf_recipe_values() -> None:
    """SEER's RegNetY-256GF recipe (the released checkpoint's name and vissl's configs: the file's header)."""
    cfg = load_config(REPO / "configs" / "seer_regnety256gf_1b.yaml", ["data.train_shards=/x"])
    assert cfg.model.arch == "regnety_256gf"
    assert (cfg.model.hidden_dims, cfg.model.embed_dim, cfg.model.head_batchnorm) == ([8192, 8192], 256, False)
    assert (cfg.optim.batch_size, cfg.model.num_prototypes) == (8192, 16000)
    assert (cfg.crops.sizes, cfg.crops.counts) == ([224, 96], [2, 4])
    assert (cfg.crops.min_scale, cfg.crops.max_scale) == ([0.14, 0.05], [1.0, 0.14])
    assert (cfg.parallel.sync_batchnorm, cfg.parallel.sync_batchnorm_group) == (True, 64)
    assert (cfg.swav.sinkhorn_iterations, cfg.swav.epsilon, cfg.swav.temperature) == (10, 0.05, 0.1)
    assert (cfg.optim.weight_decay, cfg.optim.epochs, cfg.optim.name) == (1e-5, 1, "lars")
    # vissl's lr, 0.3 per 256 images, at 8192: 9.6 -> 0.0096, warm-up from 0.3 x 128 / 256; 8000 warm-up steps
    assert (cfg.optim.base_lr, cfg.optim.final_lr, cfg.optim.start_warmup_lr) == (9.6, 0.0096, 0.15)
    assert round(cfg.optim.warmup_epochs * (10**9 // cfg.optim.batch_size)) == 8000
    assert (cfg.slurm.nodes, cfg.slurm.gpus_per_node) == (64, 8)


def test_seer_10b_recipe_values() -> None:
    """SEER 10B: vissl's seer/models/regnet10B.yaml over swav/swav_8node_resnet.yaml (the file's header)."""
    cfg = load_config(REPO / "configs" / "seer_regnety10b.yaml", ["data.train_shards=/x"])
    assert (cfg.model.arch, cfg.parallel.engine, cfg.parallel.activation_checkpointing) == (
        "regnety_10b", EngineKind.fsdp, "stage")
    assert (cfg.model.hidden_dims, cfg.model.embed_dim, cfg.model.head_batchnorm) == ([8192, 8192], 256, False)
    assert (cfg.optim.batch_size, cfg.model.num_prototypes) == (16 * 496, 16000)
    assert (cfg.crops.sizes, cfg.crops.counts) == ([160, 96], [2, 4])
    assert (cfg.swav.sinkhorn_iterations, cfg.swav.epsilon) == (10, 0.03)
    assert (cfg.optim.base_lr, cfg.optim.final_lr, cfg.optim.start_warmup_lr) == (9.3, 0.0093, 0.15)
    assert round(cfg.optim.warmup_epochs * (10**9 // cfg.optim.batch_size)) == 5500


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
    with pytest.raises(ConfigError, match=r"swav.queue_length=300 is not a multiple of the global batch "
                                          r"optim.batch_size=96; use e.g. 288"):
        load_config(None, ["data.train_shards=/x", "optim.batch_size=96", "swav.queue_length=300"])
    cfg = load_config(None, ["data.train_shards=/x", "optim.batch_size=96", "swav.queue_length=384"])
    check_world(cfg, 3)
    assert [rank_batch(96, 3, r) for r in range(3)] == [32] * 3
    check_world(cfg, 5)  # uneven: 20, 19, 19, 19, 19
    assert [rank_batch(96, 5, r) for r in range(5)] == [20, 19, 19, 19, 19]
    assert sum(rank_batch(32768, 4088, r) for r in range(4088)) == 32768  # 512 nodes of 8 that lost one
    with pytest.raises(ConfigError, match="optim.batch_size=96 .* gives some of the 97 ranks no sample"):
        check_world(cfg, 97)
    cfg.parallel.sync_batchnorm_group = 2
    with pytest.raises(ConfigError, match="parallel.sync_batchnorm_group=2 does not divide the 3 ranks"):
        check_world(cfg, 3)
    check_world(cfg, 4)


# (overrides, what the refusal says): each is refused with a message naming the key and what to do
REFUSED = [
    (["parallel.engine=deepspeed"], r"optim.name=lars with parallel.engine=deepspeed: .* \(DeepSpeed issue #490\)"),
    (["parallel.engine=fsdp2"],
     r"key 'parallel.engine': Invalid value 'fsdp2', expected one of \[ddp, fsdp, deepspeed\]"),
    (["parallel.zero_stage=4"], "parallel.zero_stage=4"),
    (["swav.sinkhorn_iterations=0"], "swav.sinkhorn_iterations=0: Sinkhorn needs at least 1"),
    (["swav.epsilon=0"], "swav.epsilon=0.0 must be positive"),
    (["parallel.zero_bucket_elements=0"], "parallel.zero_bucket_elements=0: a bucket holds at least one element"),
    (["parallel.engine=deepspeed", "optim.name=adamw", "parallel.zero_stage=3", "parallel.compile=true"],
     "parallel.compile=true with ZeRO-3: DeepSpeed gathers"),
    (["parallel.sync_batchnorm_group=-2"], "parallel.sync_batchnorm_group=-2: give the ranks per group"),
    (["optim.name=lamb"], r"key 'optim.name': Invalid value 'lamb', expected one of \[lars, sgd, adamw\]"),
    (["parallel.precision=fp16"],
     r"key 'parallel.precision': Invalid value 'fp16', expected one of \[auto, bf16, fp32\]"),
    (["checkpoint.keep=0"], "checkpoint.keep=0: keep at least the newest checkpoint"),
    (["checkpoint.every_steps=-1"], "checkpoint.every_steps=-1: give the steps between checkpoints"),
    (["logging.every_steps=0"], "logging.every_steps=0: give the steps between log lines"),
    (["eval.every_epochs=1"], "eval.every_epochs=1 runs kNN during pretraining, on eval.test_shards, which is not set"),
    (["slurm.gpus_per_node=0"], "slurm.gpus_per_node=0 needs slurm.tasks_per_node"),
    (["slurm.master_port=80"], "slurm.master_port=80: give a port from 1024 to 65535"),
    (["eval.precise_bn_images=-1"], "eval.precise_bn_images=-1: give the number of training images"),
    (["parallel.collective_timeout_s=0"],
     "parallel.collective_timeout_s=0 and parallel.wait_timeout_s=3600: give the seconds a collective may wait"),
]


def test_engine_and_optimizer_choices_are_checked() -> None:
    base = ["data.train_shards=x"]
    for overrides, message in REFUSED:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [*base, *overrides])
    cfg = load_config(None, [*base, "parallel.engine=deepspeed", "optim.name=adamw", "parallel.zero_stage=3"])
    assert (cfg.parallel.engine, cfg.parallel.zero_stage, cfg.optim.name) == ("deepspeed", 3, "adamw")


def test_choices_are_enums_that_read_and_write_as_the_words_of_the_yaml() -> None:
    cfg = load_config(None, ["data.train_shards=x", "parallel.engine=fsdp"])
    assert cfg.parallel.engine is EngineKind.fsdp and cfg.parallel.engine == "fsdp"
    text = to_yaml(cfg)
    assert "  engine: fsdp\n" in text and "  precision: auto\n" in text and "  name: lars\n" in text
    assert from_yaml_text(text).parallel.engine is EngineKind.fsdp


def test_from_yaml_text_checks_as_load_config_does() -> None:
    text = to_yaml(load_config(None, ["data.train_shards=x"]))
    with pytest.raises(ConfigError, match="unknown key 'optim.base_lrr'"):
        from_yaml_text(text.replace("  base_lr:", "  base_lrr:"))
    with pytest.raises(ConfigError, match="key 'optim.epochs'"):
        from_yaml_text(text.replace("  epochs: 100", "  epochs: ten"))
    with pytest.raises(ConfigError, match="optim.name=lars with parallel.engine=deepspeed"):
        from_yaml_text(text.replace("  engine: ddp", "  engine: deepspeed"))
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        from_yaml_text("- a list")
    with pytest.raises(ConfigError, match="run config.yaml: not valid YAML: .*found duplicate key train"):
        from_yaml_text(text + "train:\n  seed: 1\n", "run config.yaml")


def test_head_widths_are_checked() -> None:
    base = ["data.train_shards=x"]
    cfg = load_config(None, [*base, "model.hidden_dims=[8192,8192]", "model.head_batchnorm=false",
                             "model.embed_dim=256"])
    assert (cfg.model.hidden_dims, cfg.model.head_batchnorm) == ([8192, 8192], False)
    assert load_config(None, [*base, "model.hidden_dims=[]"]).model.hidden_dims == []
    assert load_config(None, base).model.hidden_dims == [2048] and load_config(None, base).model.head_batchnorm
    with pytest.raises(ConfigError, match=r"model.hidden_dims=\[2048, 0\]: every hidden width must be positive; "
                                          r"give \[\] for a single Linear"):
        load_config(None, [*base, "model.hidden_dims=[2048,0]"])
    with pytest.raises(ConfigError, match=r"model.embed_dim=0 and model.num_prototypes=3000 must both be positive"):
        load_config(None, [*base, "model.embed_dim=0"])
    with pytest.raises(ConfigError, match="key 'model.hidden_dims'"):
        load_config(None, [*base, "model.hidden_dims=wide"])


def test_the_old_hidden_dim_key_is_read_as_hidden_dims_with_a_warning(tmp_path: Path) -> None:
    """`model.hidden_dim: N`, as old YAML files, overrides and the config.yaml of runs saved before hidden_dims
    (which resume reads) give it, loads as `model.hidden_dims: [N]` ([] for 0), and the warning names the
    source and what to write instead; a layer giving both forms is refused."""
    old = tmp_path / "old.yaml"
    old.write_text("data:\n  train_shards: x\nmodel:\n  hidden_dim: 8192\n")
    with pytest.warns(FutureWarning, match=rf"{old}: model.hidden_dim is the old form of model.hidden_dims and is "
                                           r"read as model.hidden_dims: \[8192\]; write `model.hidden_dims: \[8192\]`"):
        assert load_config(old).model.hidden_dims == [8192]
    with pytest.warns(FutureWarning, match=r"command-line overrides: .* give model.hidden_dims=\[\] instead"):
        assert load_config(None, ["data.train_shards=x", "model.hidden_dim=0"]).model.hidden_dims == []
    with pytest.warns(FutureWarning) as caught:  # one warning per source; the override wins
        assert load_config(old, ["model.hidden_dim=64"]).model.hidden_dims == [64]
    assert [str(w.message).partition(": ")[0] for w in caught] == [str(old), "command-line overrides"]
    saved = to_yaml(load_config(None, ["data.train_shards=x"])).replace("  hidden_dims:\n  - 2048\n",
                                                                         "  hidden_dim: 512\n")
    assert "hidden_dim: 512" in saved
    with pytest.warns(FutureWarning, match=r"run/config.yaml: model.hidden_dim .* \[512\]"):
        assert from_yaml_text(saved, "run/config.yaml").model.hidden_dims == [512]
    both = tmp_path / "both.yaml"
    both.write_text("data:\n  train_shards: x\nmodel:\n  hidden_dim: 64\n  hidden_dims: [64]\n")
    with pytest.raises(ConfigError, match=rf"{both}: gives both model.hidden_dim and model.hidden_dims; .* keep only "
                                          "model.hidden_dims"):
        load_config(both)
    with pytest.raises(ConfigError, match=r"command-line overrides: model.hidden_dim=-1 is not a width .* write "
                                          r"model.hidden_dims: \[W\] with W > 0, or \[\] for a single Linear"):
        load_config(None, ["data.train_shards=x", "model.hidden_dim=-1"])
