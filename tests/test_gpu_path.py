"""The GPU training path, checked on the CPU: precision, per-rank randomness, host syncs,
optimizer state placement, held-out evaluation split across ranks, id checks per block.

The data-parallel parts that need two processes (buffers not broadcast, dropout masks per
rank, no vocabulary in the workers) are in tests/test_train_ray.py.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch.overrides import TorchFunctionMode

from jobs import bench
from lightrnn.allocation import Allocation
from lightrnn.config import ModelConfig, TrainConfig
from lightrnn.model import build_model, set_lstm_dtype
from lightrnn.train import column_share, evaluate, evaluate_columns, train_step
from pipeline.checkpoint import make_schedule, save_checkpoint
from pipeline.train_loop import DistConfig, ddp_options, start_state, step_seed
from pipeline.train_stream import blocks_tensor

# Tensor methods and functions that read a tensor's values back to Python: on a GPU, each
# waits for every queued kernel
SYNCS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "equal", "nonzero"}


class HostReads(TorchFunctionMode):
    """Records the calls in SYNCS and the tensors they read, skipping `exempt` tensors."""

    def __init__(self, exempt: list[torch.Tensor]) -> None:
        super().__init__()
        self.exempt = {id(t) for t in exempt}
        self.calls: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in SYNCS and not (args and id(args[0]) in self.exempt):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def _batch(vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    stream = torch.randint(0, vocab, (4, 13), generator=torch.Generator().manual_seed(seed))
    return stream[:, :-1], stream[:, 1:]


# -- precision -----------------------------------------------------------------------------


def test_the_lstm_runs_in_the_chosen_dtype_whatever_autocast_would_pick() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(50, "lightrnn", 8, 8, 2, dropout=0.0))
    x, y = _batch(50)
    seen: dict[str, torch.dtype] = {}
    model.core.lstm.register_forward_hook(lambda m, i, out: seen.__setitem__("h", out[0].dtype))
    plain = torch.nn.LSTM(8, 8, batch_first=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert plain(torch.randn(2, 3, 8))[0].dtype == torch.bfloat16  # what autocast does to an LSTM on CPU
        loss32, state = model(x, y)
    assert seen["h"] == torch.float32 and state[0].dtype == state[1].dtype == torch.float32

    set_lstm_dtype(model, "bfloat16")
    seen.clear()
    loss16, state = model(x, y, state)
    assert seen["h"] == torch.bfloat16
    assert state[0].dtype == state[1].dtype == torch.float32  # the carried state stays float32
    loss16, _ = model(x, y)
    loss16.backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.core.parameters())
    assert float(loss16.detach()) == pytest.approx(
        float(loss32.detach()), rel=2e-2
    )  # same model, 8-bit mantissa in the LSTM
    with pytest.raises(ValueError, match="float32, bfloat16"):
        set_lstm_dtype(model, "float16")


# -- host syncs --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lightrnn", "full"])
def test_a_training_step_reads_nothing_back_from_the_device(kind: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(60, kind, 8, 8, 2, dropout=0.1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = _batch(60)
    loss, state = train_step(model, optimizer, x, y, None, 1e-3, 0.5)  # creates Adam's state
    # Adam reads its step counters with .item(): they live on the CPU (see start_state), so it costs nothing
    steps = [s["step"] for s in optimizer.state.values()]
    window = torch.zeros((), dtype=torch.float64)
    with HostReads(exempt=steps) as reads:
        for _ in range(2):
            loss, state = train_step(model, optimizer, x, y, state, 1e-3, 0.5)
            window += loss.double() * x.numel()  # what the loops do with the loss between reports
    assert reads.calls == []
    with HostReads(exempt=steps) as reads:  # the same counter sees the checks the step skips
        model(x, y)
    assert reads.calls


# -- per-rank randomness and resume -----------------------------------------------------------


def _job(tmp_path: Path, **kwargs: Any) -> DistConfig:
    return DistConfig(data=str(tmp_path), output=str(tmp_path), **kwargs)


def test_ranks_start_from_the_same_weights_and_draw_different_dropout_masks(tmp_path: Path) -> None:
    config = ModelConfig(100, "lightrnn", 16, 16, 2, dropout=0.5)
    train = TrainConfig(seed=3)
    x, y = _batch(100)
    weights, losses = [], []
    for rank in (0, 1, 1):  # each as that rank's worker does it: build, seed the step, then train
        start = start_state(config, train, _job(tmp_path), torch.device("cpu"), rank, None)
        torch.manual_seed(step_seed(train.seed, rank, 0))
        weights.append(start.model.state_dict())
        losses.append(start.model.train()(x, y)[0].item())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert losses[1] == losses[2] and losses[0] != losses[1]


def test_resumed_optimizer_keeps_adam_steps_on_the_cpu(tmp_path: Path) -> None:
    config = ModelConfig(100, "lightrnn", 8, 8, 1)
    train = TrainConfig(batch_size=2, max_steps=10)
    start = start_state(config, train, _job(tmp_path), torch.device("cpu"), 0, None)
    x, y = _batch(100)
    train_step(start.model, start.optimizer, x, y, None, 1e-3, 0.5)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_checkpoint(str(folder), start.model, start.optimizer, 1, make_schedule(8, 50, 1, train), {})
    # the meta device stands in for a GPU: any device other than the CPU shows where each tensor went
    job = _job(tmp_path, init_checkpoint=str(folder))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # loading weights into meta parameters is a no-op, said once per tensor
        resumed = start_state(config, train, job, torch.device("meta"), 0, None)
    states = list(resumed.optimizer.state.values())
    assert states and all(s["step"].device.type == "cpu" and int(s["step"]) == 1 for s in states)
    assert all(s["exp_avg"].device.type == "meta" for s in states)
    assert resumed.step == 1


# -- data parallelism ---------------------------------------------------------------------------


def test_ddp_is_told_not_to_broadcast_the_word_table() -> None:
    assert ddp_options(ModelConfig(kind="lightrnn"))["broadcast_buffers"] is False
    assert ddp_options(ModelConfig(kind="adaptive"))["find_unused_parameters"] is True


@pytest.mark.parametrize(("columns", "world"), [(10, 2), (10, 3), (4, 4), (2, 3)])
def test_evaluation_split_by_columns_sums_to_the_single_process_figure(columns: int, world: int) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(40, "lightrnn", 8, 8, 1), Allocation.random(40, 1)).eval()
    stream = np.random.default_rng(0).integers(0, 40, 157)
    whole = evaluate(model, stream, eos_id=0, batch_size=columns, bptt=6)
    shares = [column_share(columns, rank, world) for rank in range(world)]
    assert [c for share in shares for c in share] == list(range(columns))  # a partition, in order
    parts = [evaluate_columns(model, stream, 0, columns, 6, share) for share in shares]
    assert sum(p.tokens for p in parts) == whole.tokens == 157
    assert sum(p.nll for p in parts) == pytest.approx(whole.nll, rel=1e-6)  # float32 sums in other batch shapes
    assert math.isfinite(whole.ppl)


def test_train_blocks_are_checked_once_on_the_host() -> None:
    batch = pa.table({"tokens": pa.array([[0, 1, 2, 3], [4, 5, 6, 7]], type=pa.list_(pa.int32()))})
    blocks = blocks_tensor(batch, 4, 8, torch.device("cpu"))
    assert blocks.dtype == torch.int64 and blocks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="id 7, outside the vocabulary 0..6: .* prepare the dataset again"):
        blocks_tensor(batch, 4, 7, torch.device("cpu"))


def test_dist_config_names_the_lstm_dtypes() -> None:
    with pytest.raises(ValueError, match="float32, bfloat16"):
        DistConfig(data="d", output="o", lstm_dtype="float16")
    assert dataclasses.replace(DistConfig(data="d", output="o"), lstm_dtype="bfloat16").lstm_dtype == "bfloat16"


# -- the GPU smoke test -----------------------------------------------------------------------


def test_the_gpu_smoke_test_says_what_it_needs() -> None:
    with pytest.raises(SystemExit, match="needs 2 GPUs; this machine shows 0"):
        bench.main(["gpu-smoke"])
