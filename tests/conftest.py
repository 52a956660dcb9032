"""Shared fixtures: small real shard sets written by the real tool from the real Fashion-MNIST files."""

from __future__ import annotations

from pathlib import Path

import pytest

from swav_scale.shards import fashion_mnist
from swav_scale.shards.make_shards import main as make_shards



def _need_fashion_mnist() -> None:
    try:
        fashion_mnist.find_dir()
    except FileNotFoundError as e:
        pytest.fail(f"{e}\n(`make test` installs it; running pytest by hand needs it too)")


@pytest.fixture(scope="session")
def fmnist_train_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """637 training images in shards of 100: six full shards and a short one (uneven on purpose)."""
    _need_fashion_mnist()
    out = tmp_path_factory.mktemp("shards") / "train"
    make_shards(["--fashion-mnist", "--split", "train", "--limit", "637", "--max-count", "100", "--out", str(out)])
    return out


@pytest.fixture(scope="session")
def fmnist_test_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _need_fashion_mnist()
    out = tmp_path_factory.mktemp("shards") / "test"
    make_shards(["--fashion-mnist", "--split", "test", "--limit", "300", "--max-count", "100", "--out", str(out)])
    return out


@pytest.fixture(scope="session")
def tiny_full_run(tmp_path_factory: pytest.TempPathFactory, fmnist_train_shards: Path) -> Path:
    """The TINY config on 2 ranks, uninterrupted: the reference that interrupted runs must equal bit for bit."""
    from runs import pretrain

    run_dir = tmp_path_factory.mktemp("runs") / "full"
    pretrain(fmnist_train_shards, run_dir)
    return run_dir
