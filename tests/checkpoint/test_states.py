"""checkpoint/states.py: the run's own states as they are saved and restored, and a per-rank state rebuilt at
another number of ranks."""

from __future__ import annotations

import pytest
import torch

from swav_scale.checkpoint.states import RNGState, reshard_reads
from swav_scale.queue import FeatureQueue
from swav_testing.ranks import run_ranks


def _old_queues(old_world: int) -> list[dict]:
    """Queues of 2 crops x 6 rows of 2 dimensions, old rank j holding j + 2 rows valued 10 j + row."""
    old = []
    for j in range(old_world):
        q = FeatureQueue(2, 6, 2)
        q.push(0, torch.arange(j + 2, dtype=torch.float32).add(10 * j).unsqueeze(1).expand(-1, 2))
        q.push(1, -q.embeddings[0, : j + 2])
        q.advance(j + 2)
        old.append(q.state_dict())
    return old


def _resharded_on_rank(rank: int, world: int, old_world: int, length: int) -> tuple[list, int, list[int]]:
    old = _old_queues(old_world)
    read = reshard_reads(rank, world, old_world)
    q = FeatureQueue(2, length, 2)
    q.load_resharded({j: old[j] for j in read}, old_world, rank, world)
    return q.embeddings[:, : q.filled].tolist(), q.filled, read


@pytest.mark.parametrize(("old_world", "world", "length"), [(2, 3, 4), (5, 2, 9), (3, 2, 3), (2, 4, 2)])
def test_resharded_queue_takes_its_share_of_every_old_rows_reading_few_files(old_world: int, world: int,
                                                                            length: int) -> None:
    """On real ranks: each new rank ends with the rows torch.tensor_split gives it of all old ranks' filled rows
    in old-rank order (cut to its queue's length), as if it had read every old file; it read at most
    ceil(old / new) + 1 of them, and the rows travelled by an all-to-all."""
    rows = torch.cat([s["embeddings"][:, : int(s["filled"])] for s in _old_queues(old_world)], dim=1)
    for rank, (got, filled, read) in enumerate(run_ranks(_resharded_on_rank, world, old_world, length)):
        share = rows.tensor_split(world, dim=1)[rank][:, :length]
        assert filled == share.shape[1] and got == share.tolist(), (rank, got, share)
        assert len(read) <= -(-old_world // world) + 1 and rank % old_world in read


def test_rng_state_holds_this_ranks_gpu_generator_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank saves and restores the generator of its own GPU, not every visible one: on a resume where the
    task sees another number of GPUs (SLURM's binding), the others belong to other ranks. CUDA's generator
    calls are stood in for; a CPU run saves none."""
    calls: list[tuple] = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or torch.ones(3))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(("set", device)))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("saved every GPU's generator"))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("restored every GPU's"))
    gpu = torch.device("cuda", 3)
    state = RNGState(gpu).state_dict()
    RNGState(gpu).load_state_dict(state)
    assert calls == [("get", gpu), ("set", gpu)] and torch.equal(state["cuda"], torch.ones(3))
    assert "cuda" not in RNGState(torch.device("cpu")).state_dict()
