"""The cost pass on Ray Train workers (pipeline/cost_pass.py) and the solver reading its shards.

A real local Ray cluster, PTB's validation text prepared as the train split, a small
LightRNN checkpoint; the sharded sums are compared with the single-process accumulation
of lightrnn/costs.py over the same token slices.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from lightrnn.allocation import Allocation
from lightrnn.config import ModelConfig, TrainConfig
from lightrnn.costs import accumulate_head_inputs, cost_blocks, dense_costs
from lightrnn.model import LightRNN
from lightrnn.realloc import allocation_cost, solve_reallocation
from pipeline.checkpoint import make_schedule, save_checkpoint
from pipeline.cost_pass import CostShardError, ShardedCosts, model_heads, owner_bounds, run_cost_pass, train_slice
from pipeline.dataset import open_dataset
from pipeline.prepare import prepare
from pipeline.runconfig import DataConfig
from pipeline.tasks import RayMapper

BATCH, BPTT = 4, 20


@pytest.fixture(scope="module", autouse=True)
def ray_local() -> Iterator[None]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # three logical CPUs on two cores: the three-worker cost pass needs one per Train worker
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def setup(ptb_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("costpass")
    data = str(root / "data")
    prepare(DataConfig(train=str(ptb_dir / "ptb.valid.txt"), block_len=2048), data)
    vocab_size = int(open_dataset(data).manifest["vocab"]["size"])
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=vocab_size, embed_dim=16, hidden_dim=24, num_layers=1, dropout=0.0)
    model = LightRNN(config, Allocation.random(vocab_size, seed=3))
    train = TrainConfig(batch_size=4)
    checkpoint = root / "checkpoint"
    checkpoint.mkdir()
    optimizer = torch.optim.Adam(model.parameters())
    save_checkpoint(str(checkpoint), model, optimizer, 1, make_schedule(8, 2048, 1, train), {})
    return {"root": root, "data": data, "checkpoint": str(checkpoint), "model": model, "vocab": vocab_size}


def _expected(setup: dict, workers: int, max_tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each rank's slice accumulated by lightrnn.costs in one process, added up."""
    model = setup["model"]
    total = None
    for rank in range(workers):
        stream = train_slice(setup["data"], rank, workers, max_tokens)
        sums = accumulate_head_inputs(model, stream, BATCH, BPTT)
        total = sums if total is None else total.merge(sums)
    assert total is not None
    return total.row_sum_VH.numpy(), total.col_sum_VH.numpy(), total.count_V.numpy()


@pytest.mark.parametrize("workers", [2, 3])  # each rank routes the words it reads to the word's owner
def test_sharded_sums_equal_one_process(setup: dict, workers: int) -> None:
    out = str(setup["root"] / f"costs-{workers}")
    per_worker = 6_000
    info = run_cost_pass(setup["checkpoint"], setup["data"], out, workers, False, BATCH, BPTT, per_worker * workers)
    row, col, count = _expected(setup, workers, per_worker)
    assert info["tokens"] == int(count.sum()) > 0
    assert info["workers"] == workers
    manifest = json.loads(Path(out, "manifest.json").read_text())
    bounds = owner_bounds(setup["vocab"], workers)
    assert [(s["start"], s["stop"]) for s in manifest["shards"]] == list(itertools.pairwise(bounds.tolist()))
    costs = ShardedCosts(out, model_heads(setup["model"]))
    V = setup["vocab"]
    np.testing.assert_array_equal(costs._read("counts", 0, V), count)
    np.testing.assert_allclose(costs._read("row_sums", 0, V), row, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(costs._read("col_sums", 0, V), col, rtol=1e-4, atol=1e-4)
    # the solver's source gives lightrnn.costs' costs, for any block and any word order
    from lightrnn.costs import HeadInputSums

    sums = HeadInputSums(torch.from_numpy(row), torch.from_numpy(col), torch.from_numpy(count))
    a_dense, b_dense = dense_costs(setup["model"], sums)
    a, b = costs(0, V)
    np.testing.assert_allclose(a, a_dense, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(b, b_dense, rtol=1e-4, atol=1e-3)
    words = np.random.default_rng(0).permutation(V)[:500]
    np.testing.assert_allclose(costs.row_costs_of(words), a_dense[words], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(costs.column_costs_of(words), b_dense[words], rtol=1e-4, atol=1e-3)
    # with a stay bonus, the same costs as the single-process source
    model = setup["model"]
    bonus = ShardedCosts(out, model_heads(model), stay_bonus=0.7, current=model.allocation())
    a_bonus, b_bonus = cost_blocks(model, sums, stay_bonus=0.7)(0, V)
    np.testing.assert_allclose(bonus(0, V)[0], a_bonus, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(bonus(0, V)[1], b_bonus, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(bonus.row_costs_of(words), a_bonus[words], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(bonus.column_costs_of(words), b_bonus[words], rtol=1e-4, atol=1e-3)
    assert not np.allclose(bonus(0, V)[0], a)


def test_solver_reads_shards_with_ray_tasks(setup: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightrnn import realloc_two_stage

    monkeypatch.setattr(realloc_two_stage, "_SPAN_WORDS", 1024)  # several candidate tasks at this V
    out = str(setup["root"] / "costs-2")
    if not Path(out, "manifest.json").exists():
        run_cost_pass(setup["checkpoint"], setup["data"], out, 2, False, BATCH, BPTT, 12_000)
    costs = ShardedCosts(out, model_heads(setup["model"]))
    current = setup["model"].allocation()
    mapper = RayMapper()
    serial, _ = solve_reallocation(costs, None, current, method="two_stage", block_size=1024)
    parallel, stats = solve_reallocation(costs, None, current, method="two_stage", block_size=1024, mapper=mapper)
    # the candidate pass (6 spans of 1,024 words) and the row groups ran as Ray tasks
    assert mapper.tasks >= 7
    np.testing.assert_array_equal(parallel.cell_of, serial.cell_of)
    assert stats.cost_after <= stats.cost_before
    assert stats.cost_after == pytest.approx(allocation_cost(costs, None, parallel), rel=1e-9)


def test_missing_or_damaged_shard_is_named(setup: dict, tmp_path: Path) -> None:
    source = setup["root"] / "costs-2"
    if not (source / "manifest.json").exists():
        run_cost_pass(setup["checkpoint"], setup["data"], str(source), 2, False, BATCH, BPTT, 12_000)
    heads = model_heads(setup["model"])
    broken = tmp_path / "missing"
    shutil.copytree(source, broken)
    (broken / "col_sums-00001.f32").unlink()
    with pytest.raises(CostShardError, match=r"col_sums-00001\.f32 is missing"):
        ShardedCosts(str(broken), heads)
    damaged = tmp_path / "damaged"
    shutil.copytree(source, damaged)
    with open(damaged / "row_sums-00000.f32", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CostShardError, match=r"row_sums-00000\.f32 is damaged"):
        ShardedCosts(str(damaged), heads)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(source, unfinished)
    (unfinished / "manifest.json").unlink()
    with pytest.raises(CostShardError, match="did not finish"):
        ShardedCosts(str(unfinished), heads)


def test_ray_mapper_yields_in_item_order_with_a_bounded_window() -> None:
    def _slow_square(shared: int, item: int) -> int:  # nested: Ray's workers get it by value
        import time

        time.sleep(0.05 * ((item * 7) % 5))  # tasks finish out of order
        return shared + item * item

    mapper = RayMapper(in_flight=3)
    results = mapper(_slow_square, 100, list(range(11)))
    assert mapper.tasks == 0  # nothing is submitted before the results are asked for
    first = next(results)
    assert first == 100 and mapper.tasks == 3  # only the window was submitted
    assert [first, *results] == [100 + i * i for i in range(11)]
    assert mapper.tasks == 11
    assert list(RayMapper()(_slow_square, 1, [])) == []
    with pytest.raises(ValueError, match="in_flight"):
        RayMapper(in_flight=0)
