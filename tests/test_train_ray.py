"""Data-parallel training on a real local Ray with 2 CPU workers and PTB-derived data.

One Ray instance (4 logical CPUs: 2 for Train workers, the rest for Ray Data, which
deadlocks with none) serves the module; one small dataset (PTB valid as train, PTB test
as valid, 2,000-token blocks) serves every test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray
import torch

from jobs import bench
from jobs import train as train_job
from jobs.chaos import TAG, kill_tagged
from jobs.configs import get_preset
from lightrnn.allocation import Allocation
from lightrnn.config import TrainConfig
from lightrnn.model import build_model
from lightrnn.train import evaluate
from pipeline.checkpoint import STATE_FILE, make_schedule, model_from_checkpoint
from pipeline.dataset import open_dataset
from pipeline.prepare import prepare
from pipeline.runconfig import DataConfig
from pipeline.train import DistConfig, RunExistsError, run_training
from pipeline.train_loop import train_loop_per_worker
from pipeline.train_stream import check_blocks, in_block_order

REPO = Path(__file__).resolve().parents[1]
TINY = get_preset("tiny")
# Ray workers cannot import this test module: send the worker loops defined here by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # 1-layer 32-unit LightRNN, dropout 0


@pytest.fixture(scope="module", autouse=True)
def ray_local() -> Iterator[None]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(ptb_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("ptb-small")
    out = str(folder / "prepared")
    # PTB valid as two files: two input units, so a block straddles them and lands in an "edges"
    # shard listed after the units' shards; the workers still read every block in block order
    lines = (ptb_dir / "ptb.valid.txt").read_text().splitlines(keepends=True)
    (folder / "train").mkdir()
    (folder / "train" / "part-0.txt").write_text("".join(lines[: len(lines) // 3]))
    (folder / "train" / "part-1.txt").write_text("".join(lines[len(lines) // 3 :]))
    test = str(ptb_dir / "ptb.test.txt")  # valid and test the same text: tests compare the two figures
    prepare(DataConfig(train=str(folder / "train"), valid=test, test=test, block_len=2000), out)
    assert open_dataset(out).shard_uris("train", edges=True), "the fixture should have a straddling block"
    return out


def _train(
    data: str, output: Path, name: str, train: TrainConfig, loop=train_loop_per_worker, model=TINY.model, **dist: object
) -> dict:
    job = DistConfig(data=data, output=str(output), name=name, **dist)  # type: ignore[arg-type]
    return run_training(model, train, job, worker_loop=loop)


def _state(summary: dict) -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(summary["checkpoint"], STATE_FILE), weights_only=True)


def test_loss_decreases_on_ptb_with_two_workers(data: str, tmp_path: Path) -> None:
    train = dataclasses.replace(TINY.train, batch_size=4, max_steps=60, lr=1e-2)
    summary = _train(data, tmp_path, "loss", train, workers=2, checkpoint_every=10, keep_checkpoints=10)
    losses = [h["loss"] for h in summary["history"]]
    assert [h["step"] for h in summary["history"]] == [10, 20, 30, 40, 50, 60]
    assert losses[-1] < losses[0] - 0.5, losses  # ln(6022) = 8.7 nats at the start
    assert summary["valid_ppl"] < 3000  # a uniform guess over 6,022 words scores 6,022
    state = _state(summary)
    assert state["step"] == 60 and state["dist_config"]["workers"] == 2
    assert len(state["allocation_id"]) == 16


def test_one_step_two_workers_equals_one_worker_on_the_same_global_batch(data: str, tmp_path: Path) -> None:
    # 4 blocks = one global batch; SGD and dropout 0 make the step a plain function of the mean gradient
    train = dataclasses.replace(TINY.train, batch_size=4, max_steps=1, lr=0.5, lr_schedule="constant")
    common = dict(limit_blocks=4, optimizer="sgd", checkpoint_every=1)
    one = _state(_train(data, tmp_path, "w1", train, workers=1, **common))["model"]
    two = _state(_train(data, tmp_path, "w2", train, workers=2, **common))["model"]
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    # and the step did move the weights: not a comparison of two untouched initialisations
    vocab_size = len(open_dataset(data).vocab())
    torch.manual_seed(TINY.train.seed)
    init = build_model(
        dataclasses.replace(TINY.model, vocab_size=vocab_size), Allocation.random(vocab_size, TINY.train.seed)
    ).state_dict()
    moved = [name for name, value in init.items() if value.is_floating_point() and not torch.equal(value, one[name])]
    assert len(moved) >= 3, moved


def loop_losing_a_worker_at_step_8(config: dict) -> None:
    """The worker loop, but the last rank's process dies before its 8th step (unless restored).

    It first lets Train commit the checkpoints reported so far, so the restart point is fixed.
    """
    import pipeline.train_loop as loop

    ctx = ray.train.get_context()
    doomed = ctx.get_world_rank() == ctx.get_world_size() - 1 and ray.train.get_checkpoint() is None
    original, steps = loop.train_step, [0]

    def train_step(*args: object, **kwargs: object) -> object:
        steps[0] += 1
        if doomed and steps[0] == 8:
            ray.train.get_all_reported_checkpoints(ray.train.CheckpointConsistencyMode.COMMITTED)
            os._exit(1)  # a lost worker, as a crash or preemption would leave it
        return original(*args, **kwargs)

    loop.train_step = train_step
    loop.train_loop_per_worker(config)


def test_killed_worker_is_restarted_from_the_last_checkpoint_and_ends_as_if_never_killed(
    data: str, tmp_path: Path
) -> None:
    # dropout on, and the step-5 checkpoint falls inside a batch (100 segments per batch): the
    # restart must take the same blocks, the same dropout masks and every rank's LSTM state
    train = dataclasses.replace(TINY.train, batch_size=4, max_steps=20)
    model = dataclasses.replace(TINY.model, dropout=0.3)
    common = dict(workers=2, checkpoint_every=5, max_failures=1)
    summary = _train(data, tmp_path, "fail", train, loop_losing_a_worker_at_step_8, model=model, **common)
    assert summary["steps"] == 20
    assert summary["start_step"] == 5  # restored from the step-5 checkpoint, not from step 0
    whole = _train(data, tmp_path, "whole", train, model=model, **common)
    assert whole["start_step"] == 0
    restored, uninterrupted = _state(summary), _state(whole)
    for name, value in uninterrupted["model"].items():
        assert torch.equal(restored["model"][name], value), name
    folders = [f for f in glob.glob(str(tmp_path / "whole" / "checkpoint_*")) if os.path.isdir(f)]
    states = [torch.load(os.path.join(f, STATE_FILE), weights_only=True) for f in folders]
    carried = [s["lstm_state"]["h"].shape for s in states if "lstm_state" in s]
    assert carried and all(shape[:3] == (2, 1, 2) for shape in carried)  # (ranks, layers, blocks per rank)


def _checkpoint_steps(run_dir: Path) -> set[int]:
    steps = set()
    for path in glob.glob(str(run_dir / "checkpoint_*" / STATE_FILE)):
        with contextlib.suppress(OSError, RuntimeError, EOFError):  # one being written when the driver stopped
            steps.add(int(torch.load(path, weights_only=True)["step"]))
    return steps


def test_resume_after_the_driver_is_stopped_continues_from_the_checkpoint(data: str, tmp_path: Path) -> None:
    args = ["--data", data, "--output", str(tmp_path), "--name", "stopped", "--workers", "2", "--config", "tiny"]
    args += ["--set", "train.batch_size=4", "--set", "train.log_every=1000", "--checkpoint-every", "20"]
    tag = uuid.uuid4().hex
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", TAG: tag}
    env.pop("RAY_ADDRESS", None)
    driver = subprocess.Popen(
        [sys.executable, "-m", "jobs.train", *args, "--max-steps", "100000"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    snapshot = tmp_path / "stopped" / "checkpoint_manager_snapshot.json"
    try:
        deadline = time.monotonic() + 120
        while not snapshot.exists() and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert snapshot.exists(), "the first run never checkpointed"
    finally:
        os.killpg(driver.pid, signal.SIGTERM)  # the driver and the Ray processes still in its group
        driver.wait(timeout=60)
        # Ray daemons that left the process group (a Train controller among them) can still prune
        # the run's checkpoints: the run is stopped only once none of them is left
        kill_tagged(tag)
    steps_on_disk = _checkpoint_steps(tmp_path / "stopped")
    assert steps_on_disk and min(steps_on_disk) > 0
    target = max(steps_on_disk) + 10
    with pytest.raises(RunExistsError, match="--resume"):  # a new run may not write over it
        _train(data, tmp_path, "stopped", TINY.train, workers=2)
    summary_line = _run_main([*args, "--max-steps", str(target), "--resume", "--json"])
    summary = json.loads(summary_line)
    assert summary["start_step"] in steps_on_disk  # not 0
    assert summary["steps"] == target
    assert all(
        h["start_step"] == summary["start_step"] for h in summary["history"] if h["step"] > summary["start_step"]
    )


def _run_main(argv: list[str]) -> str:
    """jobs.train.main in this process (reusing the module's Ray); returns its last stdout line."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert train_job.main(argv) == 0
    return out.getvalue().strip().splitlines()[-1]


def test_bad_batch_fails_before_ray_work(data: str, tmp_path: Path) -> None:
    train = dataclasses.replace(TINY.train, batch_size=3)
    with pytest.raises(ValueError, match="multiple of the 2 workers"):
        _train(data, tmp_path, "bad", train, workers=2)
    with pytest.raises(ValueError, match="smaller --block-len"):
        _train(data, tmp_path, "bad", dataclasses.replace(TINY.train, batch_size=64), workers=2)


def loop_probing_ranks(config: dict) -> None:
    """Builds the model as the worker loop does; records the weights, a dropout draw, and
    whether a word table only rank 1 holds survives a DDP step with and without broadcasts."""
    from lightrnn.config import ModelConfig, from_dict
    from pipeline.train_loop import ddp_options, start_state, step_seed

    rank = ray.train.get_context().get_world_rank()
    model_config = from_dict(ModelConfig, config["model"])
    train_config = from_dict(TrainConfig, config["train"])
    job = DistConfig(data="unused", output="unused")
    x_BT = torch.randint(0, model_config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    record: dict[str, object] = {}
    for options in (ddp_options(model_config), {"broadcast_buffers": True}):
        start = start_state(model_config, train_config, job, torch.device("cpu"), rank, None)
        if not record:
            torch.manual_seed(step_seed(train_config.seed, rank, 0))  # as the loop seeds its first step
            record["weights"] = {k: v.clone() for k, v in start.model.state_dict().items()}
            record["dropout_loss"] = start.model.train()(x_BT[:, :-1], x_BT[:, 1:])[0].item()
        ddp = ray.train.torch.prepare_model(start.model, parallel_strategy_kwargs=options)
        if rank == 1:
            start.model.row_of.copy_(start.model.row_of.flip(0))  # a table only rank 1 holds
        own = start.model.row_of.clone()
        ddp(x_BT[:, :-1], x_BT[:, 1:])[0].backward()
        record[f"table_kept_broadcast_{options['broadcast_buffers']}"] = torch.equal(start.model.row_of, own)
    torch.save(record, os.path.join(config["out"], f"rank{rank}.pt"))


def test_ranks_share_weights_not_dropout_masks_and_ddp_leaves_the_word_table_alone(tmp_path: Path) -> None:
    model = dataclasses.replace(TINY.model, vocab_size=500, num_layers=2, dropout=0.5)
    trainer = ray.train.torch.TorchTrainer(
        loop_probing_ranks,
        train_loop_config={
            "model": dataclasses.asdict(model),
            "train": dataclasses.asdict(TINY.train),
            "out": str(tmp_path),
        },
        scaling_config=ray.train.ScalingConfig(num_workers=2),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path / "runs"), name="probe"),
    )
    trainer.fit()
    zero, one = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(zero["weights"][k], one["weights"][k]) for k in zero["weights"])
    assert zero["dropout_loss"] != one["dropout_loss"]  # the same weights and batch, other dropout masks
    assert one["table_kept_broadcast_False"] and zero["table_kept_broadcast_False"]
    assert not one["table_kept_broadcast_True"]  # DDP's default would have sent rank 0's table over it


def test_workers_evaluate_in_parallel_without_the_vocabulary(data: str, tmp_path: Path) -> None:
    dataset = open_dataset(data)
    eos, valid = dataset.vocab().eos_id, dataset.tokens("valid")
    no_words = str(tmp_path / "data")
    shutil.copytree(data, no_words, ignore=shutil.ignore_patterns(dataset.manifest["vocab"]["path"]))
    train = dataclasses.replace(TINY.train, batch_size=4, max_steps=6, eval_batch_size=5)
    summary = _train(no_words, tmp_path, "eval", train, workers=2, checkpoint_every=6)
    state = _state(summary)
    model = model_from_checkpoint(summary["checkpoint"])
    single = evaluate(model, valid, eos, train.eval_batch_size, train.bptt)  # one process, every column
    assert summary["valid_ppl"] == pytest.approx(single.ppl, rel=1e-5)
    assert summary["test_ppl"] == pytest.approx(single.ppl, rel=1e-5)  # the test split is the same text
    assert state["evaluation"]["valid_tokens"] == single.tokens == len(valid)
    assert state["evaluation"]["test_ppl"] == summary["test_ppl"]


def test_bench_train_splits_the_ddp_step_with_and_without_buffer_broadcasts() -> None:
    args = ["--workers", "2", "--vocab", "3000", "--hidden", "8", "--steps", "1", "--rounds", "1", "--block-len", "64"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert bench.main(["train", *args, "--json"]) == 0
    result = json.loads(out.getvalue().strip().splitlines()[-1])
    assert set(result["variants"]) == {"broadcast_buffers=False", "broadcast_buffers=True"}
    for figures in result["variants"].values():
        assert set(figures["parts_ms"]) == {"data", "forward", "broadcast", "backward", "all_reduce", "optimizer"}
        assert sum(figures["parts_ms"].values()) == pytest.approx(figures["step_ms"], abs=0.05)
        assert figures["words_per_s"] > 0 and 0 <= figures["communication_share"] <= 1
        assert figures["lstm_output_dtype"] == figures["carried_state_dtype"] == "torch.float32"
    assert result["peak_memory_mb"] > 0 and result["step_time_ratio_on_to_off"] > 0


def test_ranks_read_disjoint_block_ranges_and_refuse_a_batch_out_of_order() -> None:
    schedule = make_schedule(103, 50, 3, dataclasses.replace(TINY.train, batch_size=6))  # 2 blocks per rank-step
    assert [schedule.rank_range(r) for r in range(3)] == [(0, 34), (34, 68), (68, 102)]
    epoch = [schedule.batch_blocks(r, b) for r in range(3) for b in range(schedule.batches_per_epoch)]
    seen = np.concatenate(epoch)
    assert seen.size == np.unique(seen).size == 102 and seen.max() == 101  # each full block once, one left over
    check_blocks(pa.table({"block": [36, 37]}), schedule.batch_blocks(1, 1), 1, 1)
    with pytest.raises(RuntimeError, match="not in block order"):
        check_blocks(pa.table({"block": [37, 36]}), schedule.batch_blocks(1, 1), 1, 1)


def test_units_and_edges_merge_into_batches_in_block_order() -> None:
    def stream(*tables: list[int]) -> list[pa.Table]:
        return [pa.table({"block": t, "tokens": [[b] * 3 for b in t]}) for t in tables]

    units = stream([0, 1, 2], [4, 5], [7, 8])  # as Ray Data hands them over: any batch sizes
    edges = stream([3], [6, 9])  # the blocks that straddle two units
    batches = list(in_block_order([units, edges], 4))
    assert [b.column("block").to_pylist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # 8, 9 incomplete
    assert batches[1].column("tokens").to_pylist()[2] == [6, 6, 6]
