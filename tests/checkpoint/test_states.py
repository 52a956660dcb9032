"""checkpoint/states.py: the run's own states as they are saved and restored, and a per-rank state rebuilt at
another number of ranks."""

from __future__ import annotations

import pytest
import torch

from swav_scale.checkpoint.states import RNGState
from swav_scale.queue import FeatureQueue


def test_resharded_queue_keeps_every_filled_row() -> None:
    old = []
    for rank in range(2):
        q = FeatureQueue(1, 6, 2)
        q.push(0, torch.full((3, 2), float(rank)))
        q.advance(3)  # half full
        old.append(q.state_dict())
    new = [FeatureQueue(1, 4, 2) for _ in range(3)]
    for rank, q in enumerate(new):
        q.load_resharded(old, rank, 3)
    rows = torch.cat([q.embeddings[0, : q.filled, 0] for q in new])
    assert sorted(rows.tolist()) == [0.0] * 3 + [1.0] * 3 and [q.filled for q in new] == [2, 2, 2]


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
