"""Checkpoints (checkpoint/manager.py): complete-or-absent directories, round trips of every state, per-rank
files on real ranks, saves in the background."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from helpers import REPO
from runs import TINY_VIT, checkpoint_contents, differences, train_in_process

import swav_scale.checkpoint.manager as manager
import swav_scale.checkpoint.staging as staging
from swav_scale.checkpoint.layout import DAMAGED, META, find_damage, rank_file
from swav_scale.checkpoint.manager import Checkpointer
from swav_scale.checkpoint.states import RNGState, TrainProgress
from swav_scale.config import OptimConfig
from swav_scale.distributed import DistEnv, broadcast
from swav_scale.engines.ddp import DDPEngine
from swav_scale.models import build_swav_model
from swav_scale.optim import build_optimizer
from swav_scale.queue import FeatureQueue
from swav_testing.ranks import run_ranks


def make_engine(world: int = 1, rank: int = 0) -> DDPEngine:
    torch.manual_seed(0)
    model = build_swav_model("resnet18", 0.125, True, [32], 16, 10)
    env = DistEnv(rank, world, rank, world, torch.device("cpu"))
    return DDPEngine(model, functools.partial(build_optimizer, cfg=OptimConfig(base_lr=0.1)), env, "fp32")


def train_steps(engine: DDPEngine, n: int, seed: int = 0, frozen_prototypes: bool = False) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        crops = [torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)]
        _, scores = engine.wrapped(crops)
        engine.backward(sum(s.pow(2).mean() for s in scores))
        if frozen_prototypes:  # as the loop does for the first swav.freeze_prototypes_iters steps
            engine.freeze_prototypes()
        engine.step()


def states(engine: DDPEngine, queue: FeatureQueue) -> tuple[dict, dict]:
    progress = TrainProgress()
    return {"engine": engine, "progress": progress}, {"queue": queue, "rng": RNGState()}


def test_round_trip_restores_model_optimizer_queue_rng(tmp_path: Path) -> None:
    env = DistEnv(0, 1, 0, 1, torch.device("cpu"))
    a = make_engine()
    train_steps(a, 3)
    qa = FeatureQueue(2, 8, 16)
    qa.push(0, torch.ones(4, 16)); qa.advance(4)
    ga, ra = states(a, qa)
    ga["progress"].step = 3
    ckpt = Checkpointer(tmp_path, env)
    torch.manual_seed(42)
    path = ckpt.save(3, ga, ra)
    expected_rand = torch.rand(3)

    b = make_engine()
    qb = FeatureQueue(2, 8, 16)
    gb, rb = states(b, qb)
    assert ckpt.latest() == path
    ckpt.load(path, gb, rb)
    assert gb["progress"].step == 3
    assert torch.equal(qb.embeddings, qa.embeddings) and qb.filled == 4
    assert torch.equal(torch.rand(3), expected_rand)
    for (n, p), (_, q) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(p, q), n
    # the optimizer state came back too: one more identical step gives identical weights
    train_steps(a, 1, seed=5)
    train_steps(b, 1, seed=5)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)


def test_only_complete_checkpoints_count(tmp_path: Path) -> None:
    env = DistEnv(0, 1, 0, 1, torch.device("cpu"))
    ckpt = Checkpointer(tmp_path, env, keep=2)
    engine = make_engine()
    g, r = states(engine, FeatureQueue(2, 8, 16))
    for step in (1, 2, 3):
        ckpt.save(step, g, r)
    assert [p.name for p in ckpt.complete_checkpoints()] == ["step-00000002", "step-00000003"]
    assert (tmp_path / "latest").read_text() == "step-00000003"
    # a save killed before its meta.json: the directory is not a checkpoint, and it is cleaned away
    (tmp_path / "step-00000004.partial").mkdir()
    (tmp_path / "step-00000004.partial" / "__0_0.distcp").write_bytes(b"half")
    assert ckpt.latest().name == "step-00000003"
    ckpt.clean_partial()
    assert not (tmp_path / "step-00000004.partial").exists()
    # killed after the rename but before the pointer moved: the directory is complete, so it wins
    ckpt.save(5, g, r)
    (tmp_path / "latest").write_text("step-00000003")
    assert ckpt.latest().name == "step-00000005"
    # pruning never leaves a run without a complete checkpoint, whatever checkpoint.keep says
    lean = Checkpointer(tmp_path / "lean", env, keep=0)
    for step in (1, 2):
        lean.save(step, g, r)
    assert [p.name for p in lean.complete_checkpoints()] == ["step-00000002"]


def _save_on_rank(rank: int, world: int, root: str) -> list[str]:
    env = DistEnv(rank, world, rank, world, torch.device("cpu"))
    engine = make_engine(world, rank)
    train_steps(engine, 2, seed=rank)  # different data per rank, DDP keeps the weights equal
    queue = FeatureQueue(2, 4, 16)
    queue.push(0, torch.full((4, 16), float(rank))); queue.advance(4)
    g, r = states(engine, queue)
    path = Checkpointer(root, env).save(2, g, r)
    # every rank reloads its own queue
    fresh = FeatureQueue(2, 4, 16)
    g2, r2 = states(make_engine(world, rank), fresh)
    Checkpointer(root, env).load(path, g2, r2)
    assert fresh.embeddings[0, 0, 0].item() == rank
    return sorted(p.name for p in path.iterdir())


def test_per_rank_state_is_saved_per_rank_on_real_ranks(tmp_path: Path) -> None:
    files = run_ranks(_save_on_rank, 2, str(tmp_path))
    assert files[0] == files[1]
    assert {"rank-00000.pt", "rank-00001.pt", META, ".metadata"} <= set(files[0])
    assert json.loads((tmp_path / "step-00000002" / META).read_text())["world_size"] == 2
    # one rank resumes both: the weights reshard through DCP, the queue keeps every old rank's rows
    env = DistEnv(0, 1, 0, 1, torch.device("cpu"))
    merged = FeatureQueue(2, 8, 16)
    g, r = states(make_engine(), merged)
    Checkpointer(tmp_path, env).load(tmp_path / "step-00000002", g, r)
    assert merged.full and merged.embeddings[0, :, 0].tolist() == [0.0] * 4 + [1.0] * 4
    # a per-rank state that cannot reshard is refused with a clear message
    g, r = states(make_engine(), FeatureQueue(2, 8, 16))
    r["custom"] = TrainProgress()
    with pytest.raises(RuntimeError, match="written by 2 ranks, this run has 1, and its per-rank 'custom' state"):
        Checkpointer(tmp_path, env).load(tmp_path / "step-00000002", g, r)


def _resume_resharded_on_rank(rank: int, world: int, root: str) -> dict:
    """Load a checkpoint `_save_on_rank` made on 3 ranks, on `world` ranks; the rank files this rank opened and
    its queue's rows."""
    env = DistEnv(rank, world, rank, world, torch.device("cpu"))
    opened: list[str] = []
    load = manager.torch.load

    def spy(f, *args, **kwargs):  # torch.load itself: DCP's reads pass through too, from file objects
        if isinstance(f, (str, Path)) and Path(f).name.startswith("rank-"):
            opened.append(Path(f).name)
        return load(f, *args, **kwargs)

    manager.torch.load = spy
    queue = FeatureQueue(2, 6, 16)
    g, r = states(make_engine(world, rank), queue)
    Checkpointer(root, env).load(Path(root) / "step-00000002", g, r)
    manager.torch.load = load
    return {"opened": opened, "rows": queue.embeddings[0, : queue.filled, 0].tolist()}


def test_a_resume_on_fewer_ranks_reads_few_rank_files_and_keeps_every_queue_row(tmp_path: Path) -> None:
    """Saved on 3 ranks, resumed on 2: each new rank opens the old rank files dealt to it and the one whose
    random streams it continues (at most ceil(3 / 2) + 1), never all of them; together the new queues hold
    every old rank's rows, in old-rank order."""
    run_ranks(_save_on_rank, 3, str(tmp_path))
    results = run_ranks(_resume_resharded_on_rank, 2, str(tmp_path))
    assert [sorted(x["opened"]) for x in results] == [["rank-00000.pt", "rank-00002.pt"], ["rank-00001.pt"]]
    assert results[0]["rows"] + results[1]["rows"] == [0.0] * 4 + [1.0] * 4 + [2.0] * 4


def _plans_sent_on_rank(rank: int, world: int, root: str) -> dict:
    """Four background saves, a step of training before each; for each save, the DCP plans this rank sent to
    rank 0 (how many items each lists, and whether it is usable or an empty one that says "unchanged"), and the
    bytes it staged; the whole state's bytes; and whether the last checkpoint loads the weights saved."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.planner import SavePlan

    sent: list[tuple[int, bool]] = []
    gather = dist.gather_object

    def spy(obj, *args, **kwargs):
        if isinstance(obj, SavePlan):
            sent.append((len(obj.items), obj.usable))
        return gather(obj, *args, **kwargs)

    dist.gather_object = spy
    env = DistEnv(rank, world, rank, world, torch.device("cpu"))
    engine = make_engine(world, rank)
    g, r = states(engine, FeatureQueue(2, 4, 16))
    checkpointer, per_save, staged = Checkpointer(root, env, keep=5, background=True), [], []
    for step in (1, 2, 3, 4):
        train_steps(engine, 1, seed=step)
        checkpointer.save(step, g, r, blocking=False)
        checkpointer.wait()
        per_save.append(sent[:])
        staged.append(staging.tensor_bytes(checkpointer._staged))
        sent.clear()
    dist.gather_object = gather
    saved = {k: v.clone() for k, v in engine.state_dict()["model"].items()}
    fresh = make_engine(world, rank)
    g2, r2 = states(fresh, FeatureQueue(2, 4, 16))
    Checkpointer(root, env).load(Path(root) / "step-00000004", g2, r2)
    loaded = fresh.state_dict()["model"]
    whole = staging.tensor_bytes({name: obj.state_dict() for name, obj in g.items()})
    return {"plans": per_save, "staged": staged, "whole": whole,
            "loads": all(torch.equal(saved[k], loaded[k]) for k in saved)}


def test_a_rank_stages_and_plans_only_what_it_writes_and_resends_its_plan_only_when_it_changed(
        tmp_path: Path) -> None:
    """Under DDP every rank holds the whole state; each gives DCP only its share of the replicated tensors'
    rows (checkpoint.replicated.own_pieces), so from the first save on it stages about half of the state on 2
    ranks, and the ranks' shares cover the state. Its plan is sent to rank 0 at the first save; after that
    DCP's plan cache (Checkpointer._planner) sends an empty one. The last checkpoint loads the weights saved."""
    results = run_ranks(_plans_sent_on_rank, 2, str(tmp_path))
    for result in results:
        (first,), second, third, fourth = result["plans"]
        assert first[0] > 10 and first[1]
        assert second == third == fourth == [(0, False)]
        assert all(b < 0.6 * result["whole"] for b in result["staged"]), result["staged"]
        assert result["loads"]
    assert sum(r["staged"][-1] for r in results) == results[0]["whole"]  # every byte staged by one writer


def _replicated_load_on_rank(rank: int, world: int, root: str) -> dict:
    """A DDP run on 3 ranks saves; fresh engines load it. Returns the bytes of replicated tensors this rank read
    from the files, the whole state's, the checkpoint's chunks and tensors, and whether every loaded tensor
    equals the saved one."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    env = DistEnv(rank, world, rank, world, torch.device("cpu"))
    engine = make_engine(world, rank)
    train_steps(engine, 2, seed=rank)
    g, r = states(engine, FeatureQueue(2, 4, 16))
    g["progress"].step = 2
    path = Checkpointer(root, env).save(2, g, r)
    saved = {k: v.clone() for k, v in engine.state_dict()["model"].items()}
    read: list[int] = []
    load = manager.read_shares
    manager.read_shares = lambda targets, checkpoint_id: read.append(load(targets, checkpoint_id))
    fresh = make_engine(world, rank)
    g2, r2 = states(fresh, FeatureQueue(2, 4, 16))
    Checkpointer(root, env).load(path, g2, r2)
    manager.read_shares = load
    whole = staging.tensor_bytes({name: obj.state_dict() for name, obj in g2.items()})
    stored = [md for md in FileSystemReader(str(path)).read_metadata().state_dict_metadata.values()
              if isinstance(md, TensorStorageMetadata)]
    loaded = fresh.state_dict()["model"]
    return {"read": read[0], "whole": whole, "tensors": len(stored), "chunks": sum(len(md.chunks) for md in stored),
            "equal": all(torch.equal(saved[k], loaded[k]) for k in saved), "step": g2["progress"].step}


@pytest.mark.slow
def test_a_replicated_state_is_read_once_across_the_ranks_and_broadcast(tmp_path: Path) -> None:
    """DDP's weights and optimizer state, whole on every rank, are written a third by each of 3 ranks, in at
    most tensors + ranks chunks; at a resume each chunk is read from the files by one rank only (the bytes read
    add up to the state once, about a third each) and every rank ends with the saved values
    (checkpoint.replicated.read_shares)."""
    results = run_ranks(_replicated_load_on_rank, 3, str(tmp_path))
    whole = results[0]["whole"]
    assert sum(r["read"] for r in results) == whole
    assert all(r["read"] < whole / 3 * 1.2 for r in results), [r["read"] for r in results]
    assert results[0]["tensors"] < results[0]["chunks"] <= results[0]["tensors"] + 3
    assert all(r["equal"] and r["step"] == 2 for r in results)


def _resume_point_on_rank(rank: int, world: int, root: str) -> str | None:
    env = DistEnv(rank, world, rank, world, torch.device("cpu"))
    engine = make_engine(world, rank)
    g, r = states(engine, FeatureQueue(2, 4, 16))
    ckpt = Checkpointer(root, env, keep=5)
    for step in (1, 2, 3, 4):
        ckpt.save(step, g, r)
    if rank == 0:  # damage after the fact: one file flipped in place, one truncated, one meta.json garbled
        flipped = Path(root) / "step-00000004" / "rank-00001.pt"
        data = bytearray(flipped.read_bytes())
        data[len(data) // 2] ^= 0xFF
        flipped.write_bytes(bytes(data))
        truncated = Path(root) / "step-00000003" / ".metadata"
        truncated.write_bytes(truncated.read_bytes()[:10])
        (Path(root) / "step-00000002" / META).write_text("{not json")
    torch.distributed.barrier()
    found = ckpt.resume_point()
    return None if found is None else found.name


def test_damaged_checkpoints_are_found_on_real_ranks_and_moved_aside(tmp_path: Path) -> None:
    """Each rank hashes a share of the files; a flipped byte (same size), a truncated file and a garbled
    meta.json are each caught, the damaged directories move to `.damaged` and every rank agrees on step 1."""
    assert run_ranks(_resume_point_on_rank, 2, str(tmp_path)) == ["step-00000001", "step-00000001"]
    assert sorted(p.name for p in tmp_path.glob("step-*")) == [
        "step-00000001", f"step-00000002{DAMAGED}", f"step-00000003{DAMAGED}", f"step-00000004{DAMAGED}"]
    assert find_damage(tmp_path / f"step-00000004{DAMAGED}", checksums=True) == [
        "rank-00001.pt does not match the sha256 recorded when it was written"]
    assert find_damage(tmp_path / f"step-00000004{DAMAGED}", checksums=False) == []  # sizes alone miss a flip
    assert find_damage(tmp_path / f"step-00000003{DAMAGED}", checksums=False)[0].startswith(".metadata has 10 bytes")
    env = DistEnv(0, 1, 0, 1, torch.device("cpu"))
    assert Checkpointer(tmp_path, env).complete_checkpoints() == [tmp_path / "step-00000001"]
    # a meta.json that lists no files vouches for nothing
    meta = json.loads((tmp_path / "step-00000001" / META).read_text())
    (tmp_path / "step-00000001" / META).write_text(json.dumps({k: v for k, v in meta.items() if k != "files"}))
    assert find_damage(tmp_path / "step-00000001", checksums=False) == [f"{META} lists no files"]


def test_a_step_directory_without_meta_is_named_once_and_moved_aside(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`step-N/` without meta.json (a partial copy, a file deleted by hand) is not resumed from: read-only
    look-ups (status, eval) name it; the resume moves it to `step-N.damaged/`, saying so once, so that a later
    save of step N does not replace it silently and the files stay for inspection."""
    env = DistEnv(0, 1, 0, 1, torch.device("cpu"))
    ckpt = Checkpointer(tmp_path, env)
    g, r = states(make_engine(), FeatureQueue(2, 8, 16))
    for step in (1, 2):
        ckpt.save(step, g, r)
    (tmp_path / "step-00000002" / META).unlink()
    capsys.readouterr()
    assert ckpt.latest() == tmp_path / "step-00000001"
    assert "skipping" in capsys.readouterr().out and (tmp_path / "step-00000002").is_dir()
    assert ckpt.resume_point() == tmp_path / "step-00000001"
    said = capsys.readouterr().out
    assert said.count("step-00000002") == 2 and f"has no {META}" in said and f"step-00000002{DAMAGED}" in said
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000001", f"step-00000002{DAMAGED}"]
    assert ckpt.resume_point() == tmp_path / "step-00000001" and "step-00000002" not in capsys.readouterr().out
    ckpt.save(2, g, r)  # saved again: the moved files are still there beside the new checkpoint
    assert (tmp_path / f"step-00000002{DAMAGED}" / rank_file(0)).is_file()


@pytest.mark.parametrize("model", [pytest.param((), id="resnet"),
                                   pytest.param(tuple(TINY_VIT), id="vit-drop-path", marks=pytest.mark.slow)])
def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(model: tuple[str, ...], fmnist_train_shards: Path,
                                                                tmp_path: Path) -> None:
    """4 steps straight, against 2 steps, a stop and a resume to 4 in a fresh launch: weights, optimizer state,
    data position and every saved RNG state are equal to the last bit. Nothing between the restore and the first
    step may draw from the global generators (as a DataLoader starting its iterator would, for its workers' base
    seed), or the resumed run's draws (a ViT's drop-path masks) are one ahead of the uninterrupted run's; and
    every generator the checkpoint saves is seeded by the run, not by the process."""
    common = (*model, "optim.batch_size=16", "swav.queue_length=32")
    train_in_process(fmnist_train_shards, tmp_path / "full", *common, "train.max_steps=4")
    for stop in (2, 4):
        train_in_process(fmnist_train_shards, tmp_path / "resumed", *common, f"train.max_steps={stop}")
    launches = json.loads((tmp_path / "resumed" / "meta.json").read_text())["launches"]
    assert [x["resumed_from"] and Path(x["resumed_from"]).name for x in launches] == [None, "step-00000002"]
    step = "checkpoints/step-00000004"
    full = checkpoint_contents(tmp_path / "full" / step, tmp_path)
    resumed = checkpoint_contents(tmp_path / "resumed" / step, tmp_path)
    assert {"python", "numpy", "torch"} <= set(full["rank-00000.pt"]["rng"])
    assert full["dcp"]["engine"]["optim"]["state"], "the optimizer state is compared too"
    assert differences(full, resumed) == []


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_files_written_atomically_follow_the_umask(umask: int, tmp_path: Path) -> None:
    """The manifest, a checkpoint's meta.json, per-rank files and pointer, a run's config.yaml and meta.json get
    0666 less the umask, as the shards and DCP files beside them do, not mkstemp's 0600 (which another user of
    a cluster cannot read)."""
    import os
    import stat

    from swav_scale.config import load_config
    from helpers import write_shards

    from swav_scale.data.manifest import MANIFEST
    from swav_scale.distributed import rank_record
    from swav_scale.runlog import write_run_info
    from swav_scale.shards.tar import Sample

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    previous = os.umask(umask)
    try:
        shards = tmp_path / "shards"
        write_shards([Sample(f"s{i}", "png", b"not an image", i % 2) for i in range(4)], shards, ["a", "b"])
        run_dir = tmp_path / "run"
        ranks = [rank_record(DistEnv(0, 1, 0, 1, torch.device("cpu")))]
        write_run_info(run_dir, load_config(REPO / "configs" / "quickstart.yaml"), ranks, None)
        write_run_info(run_dir, load_config(REPO / "configs" / "quickstart.yaml"), ranks, "again")  # rewritten
        g, r = states(make_engine(), FeatureQueue(2, 8, 16))
        step = Checkpointer(run_dir / "checkpoints", DistEnv(0, 1, 0, 1, torch.device("cpu"))).save(1, g, r)
    finally:
        os.umask(previous)
    written = [shards / MANIFEST, run_dir / "config.yaml", run_dir / "meta.json", step / META, step / "rank-00000.pt",
               run_dir / "checkpoints" / "latest"]
    assert {str(p): oct(mode(p)) for p in written} == {str(p): oct(0o666 & ~umask) for p in written}
    everything = [p for p in [*shards.rglob("*"), *run_dir.rglob("*")] if p.is_file()]
    assert {oct(mode(p)) for p in everything} == {oct(0o666 & ~umask)}
    assert not list(tmp_path.rglob("*.tmp"))


# ---- saves in the background


def rank_0s_copy(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [broadcast(t.clone(), src=0) for t in tensors]


def _background_save_on_rank(rank: int, world: int, root: str) -> dict:
    """Save step 2 in the background while rank 1's write is held; train on meanwhile; the checkpoint holds the
    weights of step 2, not those staged by `prepare` at step 1 nor those trained after it, and every rank sees
    it complete once waited for. `prepare` leaves each rank's BatchNorm statistics alone; the save makes them
    rank 0's."""
    import threading

    env = DistEnv(rank, world, rank, world, torch.device("cpu"))
    engine = make_engine(world, rank)
    ckpt = Checkpointer(root, env, background=True)
    train_steps(engine, 1, seed=rank)
    queue = FeatureQueue(2, 4, 16)
    g, r = states(engine, queue)
    own = [b.detach().clone() for b in engine.model.buffers()]  # BatchNorm statistics of this rank's batches
    differed_at_step_1 = not all(torch.equal(a, b) for a, b in zip(own, rank_0s_copy(own)))
    ckpt.prepare(g)  # as the loop does after the first step: a copy of step 1 in the staging memory
    prepare_kept_buffers = all(torch.equal(a, b) for a, b in zip(own, engine.model.buffers()))
    train_steps(engine, 1, seed=rank)
    at_save = {k: v.detach().clone() for k, v in engine.model.named_parameters()}  # (BatchNorm's buffers: rank 0's)
    queue.push(0, torch.full((4, 16), float(rank))); queue.advance(4)
    g["progress"].step = 2
    release = threading.Event()
    write = manager.atomic_write_bytes

    def held_write(path, data):  # type: ignore[no-untyped-def]
        if rank == 1:
            release.wait(60)
        write(path, data)

    manager.atomic_write_bytes = held_write
    started = ckpt.save(2, g, r, blocking=False)
    in_flight = not (Path(root) / started.name).exists()  # returned while rank 1's write is held
    buffers = [b.detach().clone() for b in engine.model.buffers()]
    save_agreed_buffers = all(torch.equal(a, b) for a, b in zip(buffers, rank_0s_copy(buffers)))
    train_steps(engine, 2, seed=10 + rank)  # training goes on: the staged copy is what gets written
    queue.push(0, torch.full((4, 16), -1.0)); queue.advance(4)
    release.set()
    newest = ckpt.wait()
    torch.distributed.barrier()
    fresh_engine, fresh_queue = make_engine(world, rank), FeatureQueue(2, 4, 16)
    g2, r2 = states(fresh_engine, fresh_queue)
    Checkpointer(root, env).load(newest, g2, r2)
    meta = json.loads((newest / META).read_text())
    return {"in_flight": in_flight, "newest": newest.name, "step": g2["progress"].step,
            "weights_of_step_2": all(torch.equal(v, at_save[k]) for k, v in fresh_engine.model.named_parameters()),
            "queue": fresh_queue.embeddings[0, 0, 0].item(), "background": meta["background"],
            "stall_below_save": meta["stall_seconds"] < meta["save_seconds"],
            "buffers": (prepare_kept_buffers, save_agreed_buffers, differed_at_step_1)}


def test_a_background_save_writes_the_staged_state_while_training_goes_on(tmp_path: Path) -> None:
    results = run_ranks(_background_save_on_rank, 2, str(tmp_path))
    for rank, result in enumerate(results):
        assert result == {"in_flight": True, "newest": "step-00000002", "step": 2, "weights_of_step_2": True,
                          "queue": float(rank), "background": True, "stall_below_save": True,
                          # prepare reads the state without side effects; the save gives every rank rank 0's
                          # BatchNorm statistics (rank 1's were its own)
                          "buffers": (True, True, rank == 1)}
    assert not list(tmp_path.glob("*.partial")) and find_damage(tmp_path / "step-00000002", checksums=True) == []


def test_a_failed_background_write_is_raised_by_the_next_wait_naming_the_rank(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    env = DistEnv(0, 1, 0, 1, torch.device("cpu"))
    ckpt = Checkpointer(tmp_path, env, background=True)
    g, r = states(make_engine(), FeatureQueue(2, 8, 16))

    def full_disk(path, data):  # type: ignore[no-untyped-def]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(manager, "atomic_write_bytes", full_disk)
    ckpt.save(1, g, r, blocking=False)
    with pytest.raises(RuntimeError, match=r"rank 0: the checkpoint written in the background failed: OSError: "
                                           r"\[Errno 28\] No space left on device"):
        ckpt.wait()
    assert ckpt.complete_checkpoints() == [] and (tmp_path / "step-00000001.partial").is_dir()
    monkeypatch.undo()
    ckpt.save(2, g, r, blocking=False)  # the next save starts afresh
    assert ckpt.wait() == tmp_path / "step-00000002"


def test_saves_by_wall_time_follow_rank_0s_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """checkpoint.every_minutes: only rank 0's clock says when (the loop agrees on it over all ranks); a save
    restarts the clock."""
    now = {"t": 1000.0}
    monkeypatch.setattr(manager.time, "monotonic", lambda: now["t"])
    main, other = (Checkpointer("unused", DistEnv(r, 2, r, 2, torch.device("cpu")), every_minutes=2)
                   for r in (0, 1))
    now["t"] += 119
    assert not main.clock_due() and not main.due(7, False, False, False, main.clock_due())
    now["t"] += 1
    assert main.clock_due() and not other.clock_due() and main.due(8, False, False, False, True)
    assert not Checkpointer("unused", DistEnv(0, 1, 0, 1, torch.device("cpu"))).clock_due()  # 0: never by time


def test_background_staging_warns_once_when_the_nodes_copies_would_not_fit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The staged copy is the state's tensors again, for every rank of the node: said once, with the sizes and
    the key that saves without it, when MemAvailable is smaller; the save goes on."""
    env = DistEnv(0, 1, 0, 4, torch.device("cpu"))  # one of 4 ranks on this node
    g, r = states(make_engine(), FeatureQueue(2, 8, 16))
    state_bytes = manager.tensor_bytes({k: v.state_dict() for k, v in g.items()})
    monkeypatch.setattr(manager, "available_memory", lambda: 3 * state_bytes)
    ckpt = Checkpointer(tmp_path, env, background=True)
    for step in (1, 2):
        ckpt.save(step, g, r, blocking=False)
    assert ckpt.wait() == tmp_path / "step-00000002"
    said = " ".join(capsys.readouterr().out.split())
    assert said.count("warning: background checkpoints stage a copy") == 1
    assert f"{4 * state_bytes / 2**30:.1f} GiB for the 4 rank(s) of this node" in said
    assert "Set checkpoint.background=false" in said
    monkeypatch.setattr(manager, "available_memory", lambda: 5 * state_bytes)
    quiet = Checkpointer(tmp_path / "fits", env, background=True)
    quiet.save(1, g, r, blocking=False)
    quiet.wait()
    assert "warning" not in capsys.readouterr().out


def test_prepare_maps_the_staging_memory_in_the_background_for_the_saves_to_reuse(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After `prepare` (once: later calls return at once) the first background save copies into the memory
    that `prepare` allocated, and writes the state of its own step. `prepare` reads no value: its buffers are
    zero-filled (their pages mapped), nothing is copied; without background saves nothing is staged."""
    engine = make_engine()
    train_steps(engine, 1)
    g, r = states(engine, FeatureQueue(2, 8, 16))
    env = DistEnv(0, 1, 0, 1, torch.device("cpu"))
    ckpt = Checkpointer(tmp_path, env, background=True)
    copies: list[torch.Tensor] = []
    copy_ = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src, non_blocking=False:
                        copies.append(src) or copy_(self, src, non_blocking=non_blocking))
    ckpt.prepare(g)
    ckpt.wait()
    monkeypatch.undo()
    assert copies == []
    staged = ckpt._staged
    assert all(not t.any() for t in staged["engine"]["model"].values())
    assert all(not s["momentum_buffer"].any() for s in staged["engine"]["optim"]["state"].values())
    assert any(t.any() for t in engine.model.state_dict().values())  # the live state is not zero
    pointers = [t.data_ptr() for t in staged["engine"]["model"].values()]
    train_steps(engine, 1)
    ckpt.prepare(g)
    assert ckpt._worker is None and ckpt._staged is staged  # prepared once
    ckpt.save(2, g, r, blocking=False)
    assert [t.data_ptr() for t in ckpt._staged["engine"]["model"].values()] == pointers
    assert ckpt.wait() == tmp_path / "step-00000002"
    restored = make_engine()
    Checkpointer(tmp_path, env).load(tmp_path / "step-00000002", *states(restored, FeatureQueue(2, 8, 16)))
    assert all(torch.equal(a, b) for a, b in zip(restored.model.state_dict().values(),
                                                 engine.model.state_dict().values()))
    synchronous = Checkpointer(tmp_path / "sync", env)
    synchronous.prepare(g)
    assert synchronous._worker is None and synchronous._staged is None


def tensors_by_path(state: object, path: str = "") -> dict[str, torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return {path.rstrip("."): state}
    if isinstance(state, dict):
        return {k: v for key, value in state.items() for k, v in tensors_by_path(value, f"{path}{key}.").items()}
    if isinstance(state, (list, tuple)):
        return {k: v for i, value in enumerate(state) for k, v in tensors_by_path(value, f"{path}{i}.").items()}
    return {}


def test_staging_prepared_while_the_prototypes_are_frozen_is_kept_once_they_train(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped configurations freeze the prototypes for their first iterations, so `prepare` (after the
    first step) sees no optimizer state for them. The first save after they begin to train keeps every prepared
    buffer, allocates for the prototypes' new optimizer state alone, and writes the values of its own step."""
    engine = make_engine()
    train_steps(engine, 1, frozen_prototypes=True)
    g, r = states(engine, FeatureQueue(2, 8, 16))
    env = DistEnv(0, 1, 0, 1, torch.device("cpu"))
    ckpt = Checkpointer(tmp_path, env, background=True)
    ckpt.prepare(g)
    ckpt.wait()
    assert "prototypes.weight" not in ckpt._staged["engine"]["optim"]["state"]
    prepared = tensors_by_path(ckpt._staged)
    train_steps(engine, 1, seed=1)  # the prototypes train from here on: their optimizer state begins
    allocated: list[tuple] = []
    host_buffer = staging.host_buffer
    monkeypatch.setattr(staging, "host_buffer", lambda shape, dtype, pin_memory:
                        allocated.append(tuple(shape)) or host_buffer(shape, dtype, pin_memory))
    g["progress"].step = 2
    ckpt.save(2, g, r, blocking=False)
    at_save = {k: v.clone() for k, v in tensors_by_path(engine.state_dict()).items()}
    staged = tensors_by_path(ckpt._staged)
    new = sorted(set(staged) - set(prepared))
    assert new == ["engine.optim.state.prototypes.weight.momentum_buffer"]
    assert allocated == [tuple(engine.model.prototypes.weight.shape)]
    assert all(staged[k].data_ptr() == prepared[k].data_ptr() for k in prepared)
    train_steps(engine, 2, seed=2)  # training goes on while the copy is written
    assert ckpt.wait() == tmp_path / "step-00000002"
    restored = make_engine()
    gr, rr = states(restored, FeatureQueue(2, 8, 16))
    Checkpointer(tmp_path, env).load(tmp_path / "step-00000002", gr, rr)
    loaded = tensors_by_path(restored.state_dict())
    assert gr["progress"].step == 2 and set(loaded) == set(at_save)
    assert [k for k in at_save if not torch.equal(loaded[k], at_save[k])] == []


def test_on_a_gpu_staging_is_pinned_asynchronous_and_waited_for_once_by_the_writer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CUDA rank (CUDA's calls stood in for, the tensors on the CPU): `prepare` registers every buffer with
    CUDA (whole pages of its own, none shared) and copies nothing; a background save issues every copy with
    non_blocking=True, records one event on the rank's current stream and returns without synchronising; the
    writer thread synchronises that event, once, before DCP reads the buffers, through a writer that copies
    nothing ahead. A synchronous save keeps DCP's default writer. Dropped buffers are unregistered."""
    import contextlib
    import gc
    import mmap
    import threading

    import torch.distributed.checkpoint as dcp

    gpu = torch.device("cuda", 1)
    log: list[tuple] = []
    registered: dict[int, int] = {}

    def register(ptr: int, length: int) -> None:
        assert ptr % mmap.PAGESIZE == 0 and length % mmap.PAGESIZE == 0
        assert all(ptr + length <= p or p + n <= ptr for p, n in registered.items()), "a page registered twice"
        registered[ptr] = length

    class Event:
        def __init__(self, **flags: bool) -> None:
            log.append(("event", flags))

        def record(self, stream: object) -> None:
            log.append(("record", stream, threading.current_thread().name))

        def synchronize(self) -> None:
            log.append(("synchronize", threading.current_thread().name))

    def never(*args: object, **kwargs: object) -> None:
        pytest.fail("a synchronisation besides the staging event's")

    monkeypatch.setattr(staging, "register_host_memory", register)
    monkeypatch.setattr(staging, "unregister_host_memory", lambda ptr: registered.pop(ptr))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: ("stream of", device))
    monkeypatch.setattr(torch.cuda, "synchronize", never)
    monkeypatch.setattr(torch.cuda.Stream, "synchronize", never)
    copy_ = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src, non_blocking=False: log.append(
        ("copy", self.data_ptr(), non_blocking)) or copy_(self, src, non_blocking=non_blocking))
    save = dcp.save
    monkeypatch.setattr(dcp, "save", lambda *args, **kwargs: log.append(("dcp.save", kwargs.get("storage_writer")))
                        or save(*args, **kwargs))

    engine = make_engine()
    train_steps(engine, 1)
    g, r = states(engine, FeatureQueue(2, 8, 16))
    ckpt = Checkpointer(tmp_path, DistEnv(0, 1, 0, 1, gpu), background=True)
    ckpt.prepare(g)
    ckpt.wait()
    buffers = [t for t in tensors_by_path(ckpt._staged).values() if t.numel() > 0]
    assert log == [] and sorted(registered) == sorted(t.data_ptr() for t in buffers)
    assert all(registered[t.data_ptr()] >= t.numel() * t.element_size() for t in buffers)

    train_steps(engine, 1)
    ckpt.save(2, g, r, blocking=False)
    main = threading.current_thread().name
    staged_copies = [e for e in log if e[0] == "copy"]
    assert {ptr for _, ptr, _ in staged_copies} == {t.data_ptr() for t in buffers}
    assert all(non_blocking for _, _, non_blocking in staged_copies)
    assert [e for e in log if e[0] in ("event", "record")] == [("event", {"blocking": True}),
                                                              ("record", ("stream of", gpu), main)]
    assert ckpt.wait() == tmp_path / "step-00000002"
    after = [e for e in log if e[0] not in ("copy", "event", "record")]
    writer = after[0][1]
    assert writer != main and after == [("synchronize", writer), ("dcp.save", after[1][1])]
    assert isinstance(after[1][1], dcp.FileSystemWriter) and after[1][1].per_thread_copy_ahead == 0

    log.clear()
    ckpt.save(3, g, r)  # blocking: from the live state, with DCP's own writer
    assert [e for e in log if e[0] != "copy"] == [("dcp.save", None)]
    ckpt._staged = None
    del buffers
    gc.collect()
    assert registered == {}


def test_a_failed_allocation_of_the_staging_memory_is_raised_by_the_next_wait(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_memory(state, pin_memory):  # type: ignore[no-untyped-def]
        raise MemoryError("cannot allocate 787 MiB")

    monkeypatch.setattr(manager, "allocate_staging", no_memory)
    ckpt = Checkpointer(tmp_path, DistEnv(0, 1, 0, 1, torch.device("cpu")), background=True)
    ckpt.prepare(states(make_engine(), FeatureQueue(2, 8, 16))[0])
    with pytest.raises(RuntimeError, match="rank 0: allocating the staging memory failed: MemoryError: cannot "
                                           "allocate 787 MiB"):
        ckpt.wait()


def _background_save_traced(rank: int, world: int, root: str) -> dict:
    """What a background save does on the host while training waits (tests/device_trace.py), against the
    tensors it stages."""
    from device_trace import DeviceTrace, optimizer_step_counters

    env = DistEnv(rank, world, rank, world, torch.device("cpu"))
    engine = make_engine(world, rank)
    train_steps(engine, 1, seed=rank)
    g, r = states(engine, FeatureQueue(2, 4, 16))
    ckpt = Checkpointer(root, env, background=True)
    given, _ = ckpt._states(g)  # this rank's share of the replicated state
    tensors = sum(1 for t in torch.utils._pytree.tree_leaves(given["engine"]) if isinstance(t, torch.Tensor))
    with DeviceTrace(host=optimizer_step_counters([engine.optimizer])) as trace:
        ckpt.save(1, g, r, blocking=False)
    ckpt.wait()
    return {"seen": trace.seen, "tensors": tensors}


def test_a_background_save_reads_the_device_only_to_stage_its_state(tmp_path: Path) -> None:
    """While training waits, a background save reads the device only to stage: the rank's own state (the
    queue's rows, `.cpu()` in FeatureQueue.state_dict, for this rank's file) and each tensor of its share of
    the global state copied into host memory, one read per tensor by design (the write must not see what training does
    next). Nothing else reads the device, copies to it or mixes the host with it, and the saves' collectives
    go over their host group. (The staging memory is fresh here: reused, it is host memory made by an earlier
    save.)"""
    for result in run_ranks(_background_save_traced, 2, str(tmp_path)):
        seen = result["seen"]
        assert seen["copies"] == seen["mixes"] == [], seen
        assert seen["reads"] == ["cpu"] + ["copy_(to host)"] * result["tensors"], seen


def test_one_background_thread_serves_the_staging_and_every_save(tmp_path: Path) -> None:
    """`prepare`'s allocation and every background save run on one thread, started once and kept: no thread
    starts or ends around a save, where the data loaders fork their workers (a thread starting or ending during
    a fork can leave the child waiting on an interpreter lock for good)."""
    import threading

    engine = make_engine()
    train_steps(engine, 1)
    g, r = states(engine, FeatureQueue(2, 8, 16))
    ckpt = Checkpointer(tmp_path, DistEnv(0, 1, 0, 1, torch.device("cpu")), background=True)
    before = set(threading.enumerate())
    ckpt.prepare(g)
    ckpt.wait()
    thread = ckpt._thread
    assert thread is not None and thread.daemon and set(threading.enumerate()) - before == {thread}
    for step in (2, 3):
        train_steps(engine, 1)
        ckpt.save(step, g, r, blocking=False)
        assert ckpt.wait() == tmp_path / f"step-{step:08d}"
        assert ckpt._thread is thread and thread.is_alive()
    assert set(threading.enumerate()) - before == {thread}


SAVE_AND_LOAD_ALONE = """
import functools, sys
from pathlib import Path
import torch
from swav_scale.checkpoint.manager import Checkpointer
from swav_scale.checkpoint.states import RNGState, TrainProgress
from swav_scale.config import OptimConfig
from swav_scale.distributed import DistEnv
from swav_scale.engines.ddp import DDPEngine
from swav_scale.models import build_swav_model
from swav_scale.optim import build_optimizer

env = DistEnv(0, 1, 0, 1, torch.device("cpu"))
engine = DDPEngine(build_swav_model("resnet18", 0.125, True, [32], 16, 10),
                   functools.partial(build_optimizer, cfg=OptimConfig(base_lr=0.1)), env, "fp32")
g, r = {"engine": engine, "progress": TrainProgress()}, {"rng": RNGState()}
ckpt = Checkpointer(Path(sys.argv[1]), env)
ckpt.load(ckpt.save(1, g, r), g, r)
"""


def test_a_one_process_save_and_load_print_no_warning(tmp_path: Path) -> None:
    """DCP's "assuming the intent is to save in a single process", at every save and load of a one-process
    run, is nothing a user can act on: the checkpoint package silences it (and only it). Run as a user runs
    it, in a fresh process, where pytest's own warning capture does not reset the filters."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", SAVE_AND_LOAD_ALONE, str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr, done.stderr
