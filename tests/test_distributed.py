"""Data parallelism (onnx_admm.distributed): the DistributedSampler split, torchrun's environment, and
two real processes on gloo: compress under torchrun against one process at the same global batch, and
the collectives that keep the ranks in step (rank 0's outcome, masks, the agreed metric, the loss)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import onnx_admm
from onnx_admm.converters.errors import UserError
from onnx_admm.cli import main
from onnx_admm.data import Dataset, shard_order
from onnx_admm.distributed import World

ROOT = Path(onnx_admm.__file__).resolve().parents[1]


# -- the split

@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 360])
@pytest.mark.parametrize("size", [1, 2, 3])
def test_shard_order_gives_every_rank_as_many_samples_and_covers_the_order(n, size):
    order = np.random.default_rng(0).permutation(n)
    shards = [shard_order(order, rank, size) for rank in range(size)]
    assert len({len(s) for s in shards}) == 1
    assert len(shards[0]) == -(-n // size)
    assert set(np.concatenate(shards).tolist()) == set(order.tolist())


def test_batch_i_of_the_ranks_holds_the_single_process_batch_i_at_the_global_batch():
    data = Dataset({"x": np.arange(40, dtype=np.float32)[:, None]}, None, {"x"})
    single = [set(f["x"][:, 0].tolist()) for f in data.batches(8, shuffle=True, seed=3)]
    ranks = [[set(f["x"][:, 0].tolist()) for f in data.batches(4, shuffle=True, seed=3, shard=(r, 2))]
             for r in range(2)]
    assert [a | b for a, b in zip(*ranks)] == single
    assert all(not (a & b) for a, b in zip(*ranks))


# -- the environment

def test_world_from_env():
    assert World.from_env({}) == World(1, 0, 0)
    world = World.from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (world.size, world.rank, world.local_rank, world.active, world.main) == (4, 3, 1, True, False)
    assert str(world.device("cuda")) == "cuda:1" and str(world.device("cuda:0")) == "cuda:0"
    assert str(World().device("cuda")) == "cuda"
    for bad in ({"WORLD_SIZE": "2", "RANK": "2"}, {"WORLD_SIZE": "x"}, {"WORLD_SIZE": "0"}):
        with pytest.raises(UserError, match="torchrun"):
            World.from_env(bad)


# -- two processes

def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    # --standalone: a rendezvous on localhost at a free port, so parallel test runs cannot collide.
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *args], env=_env(), capture_output=True, text=True, timeout=timeout)


def test_compress_on_two_processes_matches_one_at_the_same_global_batch(digits_sample, tmp_path, monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    train, test = np.load(digits_sample.train), np.load(digits_sample.test)
    np.savez(tmp_path / "train.npz", input=train["input"][:400], labels=train["labels"][:400])
    np.savez(tmp_path / "val.npz", input=test["input"][:200], labels=test["labels"][:200])
    common = ["--data", tmp_path / "train.npz", "--val-data", tmp_path / "val.npz", "--sparsity", "0.9",
              "--stages", "1", "--admm-epochs", "1", "--retrain-epochs", "1", "--threads", "1", "--bits", "4", "-q"]
    one, two = tmp_path / "one", tmp_path / "two"
    two.mkdir()

    ran = _torchrun("-m", "onnx_admm.cli", "compress", str(digits_sample.model), "-o", str(two / "out.onnx"),
                    "--report", str(two / "report.json"), "--batch-size", "16", *map(str, common))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert sorted(p.name for p in two.iterdir()) == ["out.onnx", "report.json"]  # once, and nothing temporary
    single = CliRunner().invoke(main, ["compress", str(digits_sample.model), "-o", str(one / "out.onnx"),
                                       "--report", str(one / "report.json"), "--batch-size", "32",
                                       *map(str, common)])
    assert single.exit_code == 0, single.output

    report, alone = (json.loads((d / "report.json").read_text()) for d in (two, one))
    dist = report["distributed"]
    assert (dist["world_size"], dist["rank_batch_size"], dist["global_batch_size"], dist["backend"]) == (2, 16, 32, "gloo")
    # 360 training samples (10% select the retraining state): 180 per rank in batches of 16, 12 per
    # phase, as many steps as one process takes at batch 32; each rank trains on half the samples.
    assert dist["batches_per_rank"] == [24, 24] == 2 * alone["distributed"]["batches_per_rank"]
    assert alone["distributed"] == {"world_size": 1, "rank_batch_size": 32, "global_batch_size": 32,
                                    "batches_per_rank": [24]}
    samples = [[h["samples"] for stage in r["stages"] for h in stage["history"]] for r in (report, alone)]
    assert samples == [[180, 180], [360, 360]]  # rank 0's epochs: half the samples
    # Masks, levels and kept weights bit-identical on both ranks, stage by stage.
    assert dist["identical_across_ranks"] and len(dist["stage_sha256_per_rank"]) == 2
    assert dist["stage_sha256_per_rank"][0] == dist["stage_sha256_per_rank"][1]
    # Against one process at the same global batch: the same sparsity, accuracy within 2 points (the mean
    # of two shard means is the batch mean, up to float summation order and the padded last batch).
    assert report["params"] == alone["params"]
    for key in ("compressed_accuracy", "agreement"):
        assert abs(report["metrics"][key] - alone["metrics"][key]) <= 0.02, (key, report["metrics"], alone["metrics"])


_COLLECTIVES = textwrap.dedent("""
    import math, sys, torch
    from onnx_admm.distributed import PeerFailed, World, session
    from onnx_admm.pipeline.results import AccuracyGateFailed

    world = World.from_env()
    with session(world, torch.device("cpu")):
        mask = torch.rand(5, 7, generator=torch.Generator().manual_seed(world.rank)) > 0.5
        values = torch.full((3,), float(world.rank))
        world.broadcast_([mask, values])
        assert world.gather(mask.tolist())[0] == world.gather(mask.tolist())[1] and values.tolist() == [0.0] * 3
        assert world.agreed(lambda: None if world.main else 1.0) is None
        assert world.agreed(lambda: 0.25 if world.main else 0.5) == 0.25
        assert world.mean(float(world.rank)) == 0.5 and math.isnan(world.mean(math.nan if world.main else 1.0))

        def finish():
            raise AccuracyGateFailed(None, "under the floor", None)
        try:
            world.conclude(finish, lambda report: report)
        except PeerFailed as exc:
            assert not world.main and exc.exit_status == 3 and "under the floor" in str(exc)
            print(f"rank {world.rank} follows with {exc.exit_status}")
        except AccuracyGateFailed:
            assert world.main
            print("rank 0 failed its gate")
        assert world.conclude(lambda: "done", lambda report: "followed") == ("done" if world.main else "followed")
""")


def test_collectives_keep_the_ranks_in_step(tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(_COLLECTIVES)
    ran = _torchrun(str(script), timeout=60)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "rank 0 failed its gate" in ran.stdout and "rank 1 follows with 3" in ran.stdout


def test_sigterm_to_torchrun_saves_rank_0s_last_stage_once_and_leaves_nothing_partial(digits_sample, tmp_path):
    out = tmp_path / "out.onnx"
    # Stages of a few seconds each: the signal comes after the first one, long before the second ends.
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "onnx_admm.cli",
         "compress", str(digits_sample.model), "--data", str(digits_sample.train), "-o", str(out), "--report",
         str(tmp_path / "r.json"), "--sparsity", "0.9", "--stages", "2", "--admm-epochs", "1", "--retrain-epochs", "40",
         "--threads", "1"], env=_env(), stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stderr:  # the progress lines come from rank 0 alone
            lines.append(line)
            if line.startswith("stage 2/2:"):
                proc.send_signal(signal.SIGTERM)  # as CI and `timeout` stop the launcher; it passes it on
                break
        lines += proc.stderr.read().splitlines(keepends=True)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    log = "".join(lines)
    saved = [line for line in lines if line.startswith("interrupted by SIGTERM")]
    assert len(saved) == 1 and "during stage 2: saved stage 1" in saved[0], log  # rank 1 wrote and said nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"], log  # whole, and no temporary entry
    onnx.checker.check_model(str(out))
