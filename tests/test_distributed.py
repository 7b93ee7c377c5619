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
from onnx_admm.converters.graphinfo import InputSpec
from onnx_admm.data import Dataset, shard_order
from onnx_admm.distributed import World
from onnx_admm.sources import PluginData

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


def test_a_plugins_batches_are_dealt_round_robin_and_every_rank_reads_the_whole_stream():
    calls = []

    def load():
        calls.append(1)
        for start in range(0, 50, 7):  # dicts that do not line up with the batches
            yield {"x": np.arange(start, min(start + 7, 50), dtype=np.float32)[:, None]}

    data = PluginData(load, [InputSpec("x", np.dtype(np.float32), ("N", 1))])
    whole = [f["x"][:, 0].tolist() for f in data.batches(8)]
    dealt = [[f["x"][:, 0].tolist() for f in data.batches(8, shuffle=True, shard=(r, 3))] for r in range(3)]
    assert dealt == [whole[r::3] for r in range(3)] and len(calls) == 4
    assert [len(b) for b in whole] == [8] * 6 + [2]  # the partial batch is dealt too; even_steps drops it


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


def _torchrun(*args: str, timeout: float = 120, cwd: Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # --standalone: a rendezvous on localhost at a free port, so parallel test runs cannot collide.
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *args], env={**_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout,
                          cwd=cwd)


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


_PLUGIN = textwrap.dedent("""
    import os
    import numpy as np

    def load():
        # SHORT: rank 1's stream ends early (its first samples, the selection split, are rank 0's).
        d = np.load({train!r})
        n = {short} if os.environ.get("SHORT") and os.environ.get("RANK") == "1" else {n}
        for start in range(0, n, 100):  # dicts that do not line up with the batches
            stop = min(start + 100, n)
            yield {{"input": d["input"][start:stop], "labels": d["labels"][start:stop]}}
""")


def _plugin_run(digits_sample, tmp_path: Path, n: int, short: int, *extra: str) -> list[str]:
    """The plugin ``digits_stream:load`` over the first ``n`` digits in ``tmp_path``, and compress's options."""
    (tmp_path / "digits_stream.py").write_text(_PLUGIN.format(train=str(digits_sample.train), n=n, short=short))
    test = np.load(digits_sample.test)
    np.savez(tmp_path / "val.npz", input=test["input"][:200], labels=test["labels"][:200])
    return ["compress", str(digits_sample.model), "--data", "digits_stream:load", "--val-data",
            str(tmp_path / "val.npz"), "--sparsity", "0.9", "--stages", "1", "--admm-epochs", "1",
            "--retrain-epochs", "1", "--threads", "1", "-q", *extra]


def test_a_loader_plugin_on_two_processes_deals_its_batches_and_takes_equal_steps(digits_sample, tmp_path,
                                                                                   monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir()
    # 410 samples at batch 16: 25 whole batches and one of 10, dealt 13 whole to rank 0, 12 whole and the
    # partial one to rank 1: both take 12 steps per epoch, the 13th of rank 0 and the partial one dropped.
    args = _plugin_run(digits_sample, tmp_path, 410, 410, "--batch-size", "16")
    ran = _torchrun("-m", "onnx_admm.cli", "-v", *args, "-o", str(two / "out.onnx"), "--report",
                    str(two / "report.json"), cwd=tmp_path)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert sorted(p.name for p in two.iterdir()) == ["out.onnx", "report.json"]
    onnx.checker.check_model(str(two / "out.onnx"))
    monkeypatch.chdir(tmp_path)
    single = CliRunner().invoke(main, [*args, "-o", str(one / "out.onnx"), "--report", str(one / "report.json")])
    assert single.exit_code == 0, single.output

    report, alone = (json.loads((d / "report.json").read_text()) for d in (two, one))
    dist = report["distributed"]
    assert (dist["world_size"], dist["rank_batch_size"], dist["global_batch_size"]) == (2, 16, 32)
    assert dist["batches_per_rank"] == [24, 24] and alone["distributed"]["batches_per_rank"] == [52]
    assert dist["identical_across_ranks"] and dist["stage_sha256_per_rank"][0] == dist["stage_sha256_per_rank"][1]
    samples = [h["samples"] for stage in report["stages"] for h in stage["history"]]
    assert samples == [192, 192]  # rank 0's epochs: 12 whole batches of its half
    dropped = [line for line in ran.stderr.splitlines() if "dropped the rest" in line]
    assert len(dropped) == 2, ran.stderr  # once per epoch, by rank 0 alone
    assert dropped[0].endswith("stage 1 admm epoch 1: the loader plugin's stream gave the ranks 13, 13 batches; "
                               "each took 12 steps and dropped the rest, 2 batches (26 samples) in all"), dropped
    assert "differ between the ranks" not in ran.stderr  # the selection split is the same on both
    assert report["params"] == alone["params"]


def test_a_plugin_that_gives_the_ranks_unequal_streams_still_ends_with_equal_steps(digits_sample, tmp_path):
    # Rank 0 reads 1437 samples at batch 64 (23 batches: 11 whole and the partial one dealt to it), rank 1
    # only the first 1200 (19: 9 whole dealt to it): both take 9 steps per epoch.
    args = _plugin_run(digits_sample, tmp_path, 1437, 1200, "--batch-size", "64")
    ran = _torchrun("-m", "onnx_admm.cli", "-v", *args, "-o", str(tmp_path / "out.onnx"), "--report",
                    str(tmp_path / "report.json"), cwd=tmp_path, env={"SHORT": "1"})
    assert ran.returncode == 0, ran.stdout + ran.stderr
    dist = json.loads((tmp_path / "report.json").read_text())["distributed"]
    assert dist["batches_per_rank"] == [18, 18] and dist["identical_across_ranks"]
    assert "the loader plugin's stream gave the ranks 12, 9 batches; each took 9 steps" in ran.stderr
    assert "differ between the ranks" not in ran.stderr  # the first 1000 samples are the same


_COLLECTIVES = textwrap.dedent("""
    import math, sys, numpy as np, torch
    from onnx_admm.distributed import PeerFailed, World, session
    from onnx_admm.api import _check_same_start
    from onnx_admm.data import Dataset
    from onnx_admm.pipeline.batch import even_steps
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
        assert world.every(True) and not world.every(world.main)
        # Shares of unequal length (a partial batch last): both ranks take the shorter share's whole batches.
        share = [{"x": np.zeros((4, 1))}] * (3 if world.main else 5) + [{"x": np.zeros((2, 1))}]
        assert len(list(even_steps(share, world, 4, {"x"}, "test"))) == 3
        # A plugin's first samples that differ between the ranks: rank 0 warns, once.
        _check_same_start(world, Dataset({"x": np.zeros((3, 1))}, None, {"x"}))
        _check_same_start(world, Dataset({"x": np.full((3, 1), float(world.rank))}, None, {"x"}))

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
    assert ran.stderr.count("the loader plugin's first 3 samples differ between the ranks") == 1, ran.stderr


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
