"""How replicated tensors are cut into the ranks' pieces (checkpoint/replicated.py), on layouts of the sizes
that matter: each rank writes and reads about the state / ranks, the pieces cover every row once, and their
number stays within tensors + ranks."""

from __future__ import annotations

import math

import torch

from swav_scale.checkpoint.replicated import own_pieces, piece_layout


def _check(tensors: list[tuple[str, torch.Size, int]], world: int) -> list[int]:
    """Asserts that the layout covers each tensor's rows once, in order, with at most tensors + world pieces;
    returns the bytes each rank writes."""
    layout = piece_layout(tensors, world)
    written = [0] * world
    for name, shape, size in tensors:
        pieces = layout[name]
        rows = shape[0] if len(shape) else 0
        assert pieces[0].row == 0 and sum(p.rows for p in pieces) == rows
        assert all(a.row + a.rows == b.row and a.writer < b.writer for a, b in zip(pieces, pieces[1:]))
        row_bytes = math.prod(shape[1:]) * size if len(shape) else size
        for p in pieces:
            written[p.writer] += p.rows * row_bytes if len(shape) else size
    assert sum(len(p) for p in layout.values()) <= len(tensors) + world
    return written


def test_each_rank_writes_about_the_state_over_the_ranks() -> None:
    tensors = [(f"layer{i}.weight", torch.Size([256 * (1 + i % 5), 64, 3, 3]), 4) for i in range(50)]
    tensors += [(f"layer{i}.bias", torch.Size([256]), 4) for i in range(50)] + [("step", torch.Size([]), 8)]
    total = sum(math.prod(s) * b for _, s, b in tensors)
    for world in (1, 3, 8, 64, 512):
        written = _check(tensors, world)
        assert sum(written) == total
        row = 64 * 3 * 3 * 4
        assert max(written) <= total / world + row, (world, max(written), total / world)


def test_rows_larger_than_a_share_leave_ranks_without_rows() -> None:
    """Four rows of 1 MB over 16 ranks: four ranks write a row each, the others none; a 0-d tensor is one
    piece, written by the rank whose range it starts in."""
    tensors = [("a", torch.Size([4, 250_000]), 4), ("b", torch.Size([]), 4)]
    written = _check(tensors, 16)
    assert sorted(written, reverse=True)[:4] == [1_000_000] * 4 and sum(written) == 4_000_004


def test_a_rank_gives_dcp_its_rows_only_as_views_of_the_live_tensors() -> None:
    state = {"model": {"w": torch.arange(40.0).reshape(10, 4), "b": torch.zeros(3)}, "progress": {"step": 7}}
    given = [own_pieces(state, 2, r) for r in range(2)]
    rows = {r: g[0]["model"].get("w") for r, g in enumerate(given)}
    assert rows[0] is not None and rows[1] is not None and rows[0].shape[0] + rows[1].shape[0] == 10
    assert rows[0].data_ptr() == state["model"]["w"].data_ptr()  # a view, no copy
    assert given[1][1]["model.w"] == (rows[0].shape[0], 10, 4)  # first row, then the whole shape
    assert all(g[0]["progress"] == {"step": 7} for g in given)  # what is not a tensor, on every rank
    assert sum("b" in g[0]["model"] for g in given) == 1
