"""A data-parallel training step on Ray Train, timed part by part: data, forward, backward, all-reduce, optimizer.

    python -m jobs.bench train --workers 2 --vocab 1000000 --hidden 64 --json
    python -m jobs.bench train --gpu --workers 2 --vocab 1000000 --hidden 1024 --lstm-dtype bfloat16 --json

The workers build the model, the DDP wrapper, the autocast and the optimizer exactly as
`pipeline.train_loop` does, and step like it: random token blocks checked on the host and
moved to the device per batch, BPTT segments with the state carried, gradient clipping,
Adam. Two DDP variants train side by side in the same workers, a few steps each in turn:
`broadcast_buffers=False` (the loop's choice) and DDP's default `True`, which re-sends the
word-table buffers from rank 0 before every forward.

Each part is timed with the device synchronised around it. DDP overlaps the gradient
all-reduce with the backward pass and the buffer broadcast happens inside its forward, so
each variant's timed steps are followed by as many calibration steps of its bare module
(no buffer broadcast) with a backward under `no_sync()` (no all-reduce); the differences
are what DDP adds: `broadcast` (the buffer broadcast and DDP's own forward work) and
`all_reduce` (the part of the gradient all-reduce the backward pass does not hide).
words/s counts every worker's words.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import torch

from lightrnn.allocation import Allocation
from lightrnn.config import ModelConfig, TrainConfig, from_dict
from lightrnn.model import LSTM_DTYPES, build_model, set_lstm_dtype
from lightrnn.train import lr_at, make_optimizer, segments
from pipeline.memory import peak_rss_mb, reset_peak
from pipeline.train_loop import ddp_options, training_autocast, worker_device
from pipeline.train_stream import blocks_tensor

PARTS = ("data", "forward", "broadcast", "backward", "all_reduce", "optimizer")
RESULT_FILE = "bench.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (one GPU each with --gpu)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker: NCCL, bf16 autocast")
    parser.add_argument("--vocab", type=int, default=1_000_000, help="vocabulary size V")
    parser.add_argument("--hidden", type=int, default=64, help="LSTM width H (and embedding width)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--model", default="lightrnn", choices=("lightrnn", "full", "adaptive"))
    parser.add_argument("--batch", type=int, default=4, help="blocks per worker per step")
    parser.add_argument("--bptt", type=int, default=35)
    parser.add_argument("--block-len", type=int, default=1024, help="tokens per block (the state is carried inside)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--lstm-dtype", default="float32", choices=tuple(LSTM_DTYPES))
    parser.add_argument(
        "--broadcast-buffers", default="both", choices=("both", "off", "on"), help="DDP variants to time"
    )
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="Ray CPUs per worker")


class _Timer:
    """Seconds per part, the device synchronised at each mark so kernels are charged to their part."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.last = time.perf_counter()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def mark(self, part: str | None) -> None:
        self.sync()
        now = time.perf_counter()
        if part is not None:
            self.seconds[part] += now - self.last
        self.last = now


def _blocks(rng: np.random.Generator, batch: int, block_len: int, vocab: int) -> pa.Table:
    """A batch of random token blocks shaped like the Parquet batches the loop reads."""
    flat = rng.integers(0, vocab, batch * block_len, dtype=np.int32)
    offsets = pa.array(np.arange(0, flat.size + 1, block_len, dtype=np.int32))
    return pa.table({"tokens": pa.ListArray.from_arrays(offsets, pa.array(flat))})


class _Variant:
    """One DDP-wrapped model with its optimizer, the state it carries and its timings."""

    def __init__(self, config: dict[str, Any], broadcast: bool, device: torch.device) -> None:
        model_config = from_dict(ModelConfig, config["model"])
        self.train = from_dict(TrainConfig, config["train"])
        torch.manual_seed(self.train.seed)  # the same weights on every rank, as in the loop
        allocation = Allocation.random(model_config.vocab_size, 0) if model_config.kind == "lightrnn" else None
        self.model = build_model(model_config, allocation).to(device)
        set_lstm_dtype(self.model, config["lstm_dtype"])
        self.optimizer = make_optimizer(self.model, self.train)
        options = {**ddp_options(model_config), "broadcast_buffers": broadcast}
        self.ddp = ray.train.torch.prepare_model(self.model, parallel_strategy_kwargs=options)
        self.name = f"broadcast_buffers={broadcast}"
        self.timer = _Timer(device)
        self.calibration = _Timer(device)
        self.rng = np.random.default_rng(1 + ray.train.get_context().get_world_rank())
        self.segments: list[tuple[torch.Tensor, torch.Tensor, bool]] = []
        self.state: Any = None
        self.step = 0
        self.dtypes: dict[str, str] = {}
        self.model_config = model_config
        self.device = device
        self.model.train()

    def _next(self, config: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, bool]:
        if not self.segments:
            batch = _blocks(self.rng, config["batch"], config["block_len"], self.model_config.vocab_size)
            blocks_BL = blocks_tensor(batch, config["block_len"], self.model_config.vocab_size, self.device)
            self.segments = [(x, y, i == 0) for i, (x, y) in enumerate(segments(blocks_BL.t(), self.train.bptt))]
            self.segments.reverse()
        return self.segments.pop()

    def steps(self, config: dict[str, Any], n: int, autocast_on: bool) -> None:
        """`n` training steps as `lightrnn.train.train_step` takes them, each part timed."""
        timer = self.timer
        timer.mark(None)
        for _ in range(n):
            x_BT, y_BT, new_batch = self._next(config)
            if new_batch:
                self.state = None
            timer.mark("data")
            lr = lr_at(self.step, 10_000, self.train)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            state = None if self.state is None else (self.state[0].detach(), self.state[1].detach())
            with training_autocast(autocast_on):
                loss, self.state = self.ddp(x_BT, y_BT, state, check=False)
            timer.mark("forward")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            timer.mark("backward")
            torch.nn.utils.clip_grad_norm_(self.ddp.parameters(), self.train.clip)
            self.optimizer.step()
            timer.mark("optimizer")
            self.step += 1

    def calibrate(self, config: dict[str, Any], n: int, autocast_on: bool) -> None:
        """The bare module's forward and a backward under no_sync: compute without DDP's traffic."""
        timer = self.calibration

        def record_dtype(module: torch.nn.Module, args: Any, out: Any) -> None:
            self.dtypes["lstm_output"] = str(out[0].dtype)  # the dtype the LSTM computed in

        hook = self.model.core.lstm.register_forward_hook(record_dtype)
        for _ in range(n):
            x_BT, y_BT, _ = self._next(config)
            timer.mark(None)
            with training_autocast(autocast_on):
                loss, state = self.model(x_BT, y_BT, None, check=False)
            timer.mark("forward")
            self.dtypes["carried_state"] = str(state[0].dtype)
            with self.ddp.no_sync():
                loss.backward()
            timer.mark("backward")
            self.optimizer.zero_grad(set_to_none=True)
        hook.remove()


def _summary(variant: _Variant, timed_steps: int, calibration_steps: int, words_per_step: int) -> dict[str, Any]:
    """Per-step milliseconds of each part; DDP's communication as measured minus calibrated compute."""
    per = {part: variant.timer.seconds[part] / timed_steps for part in PARTS}
    bare = {part: variant.calibration.seconds[part] / calibration_steps for part in ("forward", "backward")}
    per["broadcast"] = max(0.0, per["forward"] - bare["forward"])
    per["forward"] -= per["broadcast"]
    per["all_reduce"] = max(0.0, per["backward"] - bare["backward"])
    per["backward"] -= per["all_reduce"]
    step = sum(per.values())
    return {
        "step_ms": round(step * 1e3, 2),
        "parts_ms": {k: round(v * 1e3, 2) for k, v in per.items()},
        "words_per_s": round(words_per_step / step, 1),
        "communication_share": round((per["broadcast"] + per["all_reduce"]) / step, 4),
        **{f"{k}_dtype": v for k, v in variant.dtypes.items()},
    }


def bench_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: the variants in turn, each with its calibration; rank 0 reports the figures."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = worker_device(config["gpu"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reset_peak()
    variants = [_Variant(config, broadcast, device) for broadcast in config["broadcast"]]
    for variant in variants:  # warm-up: allocator, kernels, Adam's state
        variant.steps(config, 2, config["gpu"])
        variant.timer.seconds = dict.fromkeys(PARTS, 0.0)
    for _ in range(config["rounds"]):  # drift on a busy machine hits every variant and its calibration alike
        for variant in variants:
            variant.steps(config, config["steps"], config["gpu"])
            variant.calibrate(config, config["steps"], config["gpu"])
    words_per_step = world * config["batch"] * config["bptt"]
    timed = config["rounds"] * config["steps"]
    figures = {v.name: _summary(v, timed, timed, words_per_step) for v in variants}
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()
    metrics = {"variants": figures, "peak_memory_mb": round(peak, 1), "device": str(device), "world": world}
    folder = tempfile.mkdtemp(prefix="bench-train-") if rank == 0 else None
    if folder:
        with open(os.path.join(folder, RESULT_FILE), "w") as f:
            json.dump(metrics, f)
    ray.train.report({"done": 1}, checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None)


def run(args: argparse.Namespace) -> dict:
    if args.workers < 1:
        raise SystemExit(f"--workers must be >= 1, got {args.workers}")
    if args.block_len <= args.bptt:
        raise SystemExit(f"--block-len ({args.block_len}) must exceed --bptt ({args.bptt})")
    broadcast = {"both": [False, True], "off": [False], "on": [True]}[args.broadcast_buffers]
    model = ModelConfig(args.vocab, args.model, args.hidden, args.hidden, args.layers, dropout=0.1)
    config = {
        "model": asdict(model),
        "train": asdict(TrainConfig(batch_size=args.batch * args.workers, bptt=args.bptt, lr=1e-3)),
        "lstm_dtype": args.lstm_dtype,
        "gpu": args.gpu,
        "broadcast": broadcast,
        "batch": args.batch,
        "bptt": args.bptt,
        "block_len": args.block_len,
        "steps": args.steps,
        "rounds": args.rounds,
    }
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
    resources = {"CPU": args.cpus_per_worker}
    with tempfile.TemporaryDirectory(prefix="bench-train-runs-") as storage:
        trainer = ray.train.torch.TorchTrainer(
            bench_loop,
            train_loop_config=config,
            scaling_config=ray.train.ScalingConfig(
                num_workers=args.workers, use_gpu=args.gpu, resources_per_worker=resources
            ),
            run_config=ray.train.RunConfig(storage_path=storage, name="bench"),
        )
        result = trainer.fit()
        with result.checkpoint.as_directory() as folder, open(os.path.join(folder, RESULT_FILE)) as f:
            measured = json.load(f)
    _print(args, measured)
    figures = measured["variants"]
    out = {
        "benchmark": "train",
        "model": args.model,
        "vocab": args.vocab,
        "hidden": args.hidden,
        "layers": args.layers,
        "workers": args.workers,
        "gpu": args.gpu,
        "lstm_dtype": args.lstm_dtype,
        "batch_per_worker": args.batch,
        "bptt": args.bptt,
        **{k: measured[k] for k in ("peak_memory_mb", "device")},
        "variants": figures,
    }
    if len(figures) == 2:
        on, off = figures["broadcast_buffers=True"], figures["broadcast_buffers=False"]
        out["step_time_ratio_on_to_off"] = round(on["step_ms"] / off["step_ms"], 3)
        comm_off = off["parts_ms"]["broadcast"] + off["parts_ms"]["all_reduce"]
        comm_on = on["parts_ms"]["broadcast"] + on["parts_ms"]["all_reduce"]
        out["communication_ratio_on_to_off"] = round(comm_on / comm_off, 2) if comm_off else None
    return out


def _print(args: argparse.Namespace, measured: dict[str, Any]) -> None:
    print(
        f"{args.model} V={args.vocab:,} H={args.hidden} L={args.layers}, {args.workers} worker(s) on "
        f"{measured['device'].split(':')[0]}, {args.batch} blocks x {args.bptt} words per worker, LSTM "
        f"{args.lstm_dtype}; {args.rounds} rounds x {args.steps} steps per variant"
    )
    print(f"{'DDP':<24}{'words/s':>10}{'step ms':>9}" + "".join(f"{p:>11}" for p in PARTS) + f"{'comm':>7}")
    for name, f in measured["variants"].items():
        parts = "".join(f"{f['parts_ms'][p]:>11.1f}" for p in PARTS)
        print(f"{name:<24}{f['words_per_s']:>10,.0f}{f['step_ms']:>9.1f}{parts}{f['communication_share']:>7.0%}")
    first = next(iter(measured["variants"].values()))
    print(
        f"peak memory {measured['peak_memory_mb']:,.0f} MB per worker; LSTM output "
        f"{first.get('lstm_output_dtype')}, carried state {first.get('carried_state_dtype')}"
    )
