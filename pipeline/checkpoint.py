"""The checkpoint format of the training phases, and the step schedule every rank derives.

A checkpoint is a folder Ray Train commits under a run's storage (`RUN/checkpoint_<time>/`):

    state.pt            weights (without the word table), optimizer state, step, data
                        position, the LSTM state of every rank when the step falls
                        inside a batch, and the configs; loaded with weights_only=True
    allocation.parquet  LightRNN only: the word -> cell table those weights were trained
                        with, the one copy of it (the model's lookups are rebuilt from it)

Ray Train names the folders (`checkpoint_<timestamp>`, which sort by time) and keeps
`checkpoint_manager_snapshot.json` beside them; a run folder with that file can be resumed.
Everything here reads and writes through `pipeline.storage`, so a checkpoint may live on
local disk or an object store.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from lightrnn.allocation import Allocation
from lightrnn.config import ModelConfig, TrainConfig, from_dict
from lightrnn.model import LanguageModel, LightRNN, State, build_model
from pipeline import storage

STATE_FILE = "state.pt"
ALLOCATION_FILE = "allocation.parquet"
CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train's folder names
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints
# model buffers that checkpoints written before the word table left the state dict still hold
_LEGACY_TABLE_KEYS = ("row_of", "col_of", "occupied_RC")


class CheckpointError(storage.StorageError):
    """A checkpoint folder that is missing, incomplete or not readable."""


# -- the schedule ----------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """Step counts and data positions every rank derives identically from the block count.

    Rank r reads the consecutive blocks [r S, r S + P B) of the train split in every epoch
    (S = `rank_stride`, P = `batches_per_epoch`, B = `local_batch`), B at a time in block
    order, so each step reads the same tokens however often the run was restarted.
    """

    local_batch: int  # blocks per rank per step
    batches_per_epoch: int
    segments_per_batch: int
    total_steps: int
    rank_stride: int  # blocks between the first blocks of two ranks (train_blocks // world)

    @property
    def steps_per_epoch(self) -> int:
        return self.batches_per_epoch * self.segments_per_batch

    def position(self, step: int) -> tuple[int, int, int]:
        """(epoch, batch in epoch, segment in batch) at which `step` (0-based) reads."""
        epoch, rest = divmod(step, self.steps_per_epoch)
        batch, segment = divmod(rest, self.segments_per_batch)
        return epoch, batch, segment

    def rank_range(self, rank: int) -> tuple[int, int]:
        """[start, stop) block ids `rank` reads in every epoch."""
        start = rank * self.rank_stride
        return start, start + self.batches_per_epoch * self.local_batch

    def batch_blocks(self, rank: int, batch: int) -> np.ndarray:
        """The block ids of `rank`'s batch `batch` (of an epoch), in the order of its rows."""
        start = self.rank_range(rank)[0] + batch * self.local_batch
        return np.arange(start, start + self.local_batch, dtype=np.int64)


def make_schedule(train_blocks: int, block_len: int, world: int, config: TrainConfig) -> Schedule:
    """The schedule of `world` ranks sharing `train_blocks` full blocks; refuses a batch that cannot be formed."""
    if config.batch_size % world:
        raise ValueError(
            f"train.batch_size={config.batch_size} (the global batch, in blocks) must be a multiple of "
            f"the {world} workers"
        )
    local = config.batch_size // world
    batches = (train_blocks // world) // local
    if batches < 1 or block_len < 2:
        raise ValueError(
            f"{train_blocks} full blocks of {block_len} tokens cannot give {world} workers a batch of {local}: "
            "lower train.batch_size or prepare the data with a smaller --block-len"
        )
    segments = math.ceil((block_len - 1) / config.bptt)
    total = config.max_steps or max(1, round(batches * segments * config.epochs))
    return Schedule(local, batches, segments, total, train_blocks // world)


# -- writing ----------------------------------------------------------------------------


def allocation_id(allocation: Allocation) -> str:
    """A short content hash, so a checkpoint names the allocation it was trained with."""
    return hashlib.sha1(np.ascontiguousarray(allocation.cell_of, dtype=np.int64).tobytes()).hexdigest()[:16]


def save_checkpoint(
    directory: str,
    model: LanguageModel,
    optimizer: torch.optim.Optimizer,
    step: int,
    schedule: Schedule,
    configs: dict[str, Any],
    lstm_state: State | None = None,
) -> None:
    """Write a checkpoint into the local folder `directory` (Ray Train then uploads it whole).

    `lstm_state` is the (h, c) carried into `step` by every rank, stacked on a leading rank
    axis: (world, layers, B, H) each. It is saved when `step` falls inside a batch, so a
    restored run continues that batch with the state an uninterrupted run would have.
    """
    epoch, batch, segment = schedule.position(step)
    state: dict[str, Any] = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "data_position": {"epoch": epoch, "batch": batch, "segment": segment},
        "model_config": asdict(model.config),  # vocab_size resolved from the dataset
        **configs,  # train_config and dist_config, as plain dicts
    }
    if lstm_state is not None and segment:
        state["lstm_state"] = {"h": lstm_state[0].detach().cpu(), "c": lstm_state[1].detach().cpu()}
    if isinstance(model, LightRNN):
        allocation = model.allocation()
        allocation.save(os.path.join(directory, ALLOCATION_FILE))
        state["allocation_id"] = allocation_id(allocation)
    torch.save(state, os.path.join(directory, STATE_FILE))


# -- reading ----------------------------------------------------------------------------


def load_state(uri: str) -> dict[str, Any]:
    """The `state.pt` of the checkpoint at `uri` (local path or any fsspec URI), on the CPU.

    Tensors stay on the CPU: `load_state_dict` copies weights to the model's device, and
    the optimizer moves its state beside the parameters, keeping Adam's `step` counters
    on the CPU where the optimizer reads them without a device sync.
    """
    try:
        with storage.open(storage.join(uri, STATE_FILE), "rb") as f:
            raw = f.read()
    except FileNotFoundError as e:
        raise CheckpointError(f"{uri} holds no {STATE_FILE}: not a checkpoint folder, or an incomplete one") from e
    state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    for key in _LEGACY_TABLE_KEYS:  # the table comes from allocation.parquet
        state["model"].pop(key, None)
    return state


def load_allocation(uri: str) -> Allocation:
    """An allocation Parquet file at any URI (`Allocation.save` format)."""
    with storage.open(uri, "rb") as f:
        return Allocation.load(f)


def checkpoint_allocation(uri: str) -> Allocation:
    """The word table a checkpoint's weights were trained with."""
    return load_allocation(storage.join(uri, ALLOCATION_FILE))


def model_from_checkpoint(uri: str, device: str | torch.device = "cpu") -> LanguageModel:
    """The model saved in the checkpoint at `uri`, in eval mode on `device`."""
    state = load_state(uri)
    config = from_dict(ModelConfig, state["model_config"])
    allocation = checkpoint_allocation(uri) if config.kind == "lightrnn" else None
    model = build_model(config, allocation)
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def checkpoint_step(uri: str) -> int:
    return int(load_state(uri)["step"])


def has_run(run_dir: str) -> bool:
    """Whether `run_dir` holds a Ray Train run that can be resumed (its snapshot exists)."""
    return storage.exists(storage.join(run_dir, RAY_SNAPSHOT))


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest checkpoint folder of a Ray Train run (names sort by time), or None."""
    names = [n for n in storage.listdir(run_dir) if n.startswith(CHECKPOINT_PREFIX) and n != RAY_SNAPSHOT]
    return storage.join(run_dir, max(names)) if names else None
