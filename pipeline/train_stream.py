"""The data position of every training step: a rank's blocks in block order, cut into BPTT segments.

A rank reads its block range of the train split as two Ray Data streams, the units'
shards and the edges' shards (the blocks that straddle units, `pipeline.dataset`), each
in block order; `in_block_order` merges them by block id into batches of `B` blocks,
`check_blocks` refuses a batch that is not the one the schedule gives that step, and
`segment_stream` walks every (B, block_len) batch in BPTT segments, resuming inside a batch
after a restore (`pipeline.train_loop` has the picture).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from lightrnn.train import segments
from pipeline.checkpoint import Schedule


def blocks_tensor(batch: pa.Table, block_len: int, vocab_size: int, device: torch.device) -> torch.Tensor:
    """(B, block_len) int64 ids on `device` from a pyarrow batch of full blocks, checked on the host.

    The range check runs here, once per batch of blocks on the host, so the training
    steps never read ids back from the device (`train_step` passes `check=False`).
    """
    flat = batch.column("tokens").combine_chunks().flatten().to_numpy()
    if flat.size and (flat.min() < 0 or flat.max() >= vocab_size):
        bad = flat[(flat < 0) | (flat >= vocab_size)][0]
        raise ValueError(
            f"a train block holds id {bad}, outside the vocabulary 0..{vocab_size - 1}: the blocks and "
            "the vocabulary come from different prepare runs; prepare the dataset again"
        )
    return torch.from_numpy(flat.astype(np.int64).reshape(batch.num_rows, block_len)).to(device)


def check_blocks(batch: pa.Table, expected: np.ndarray, rank: int, index: int) -> None:
    """Refuse a batch whose block ids are not the ones the schedule gives this rank's batch `index`."""
    blocks = batch.column("block").to_numpy()
    if not np.array_equal(blocks, expected):
        raise RuntimeError(
            f"rank {rank}: batch {index} read blocks {blocks[:4].tolist()}... where the schedule has "
            f"{expected[:4].tolist()}...: the dataset's shards are not in block order, or the block "
            "range filter was not applied; prepare the dataset again"
        )


def in_block_order(streams: list[Iterable[pa.Table]], size: int) -> Iterator[pa.Table]:
    """Tables of `size` rows from `streams` (each in block order) merged by block id; a last
    incomplete batch is dropped. The units' shards and the edges' shards of a rank's block range
    are two such streams: the straddling blocks go between the others."""

    def rows(stream: Iterable[pa.Table]) -> Iterator[tuple[int, pa.Table]]:
        for table in stream:
            for i, block in enumerate(table.column("block").to_numpy().tolist()):
                yield block, table.slice(i, 1)

    pending: list[pa.Table] = []
    for _, row in heapq.merge(*(rows(s) for s in streams), key=lambda item: item[0]):
        pending.append(row)
        if len(pending) == size:
            yield pa.concat_tables(pending).combine_chunks()
            pending = []


def segment_stream(
    shards: list[Any],
    schedule: Schedule,
    block_len: int,
    vocab_size: int,
    bptt: int,
    span: tuple[int, int],
    device: torch.device,
    rank: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """(tokens_BT, targets_BT, segment) for steps `span` = [start, stop) of this rank, in order,
    from `shards` (Ray Data iterators of the rank's block range, merged by block id).

    Each epoch re-reads the rank's block range; batches a restored run had consumed before
    its checkpoint are skipped, and its first batch starts at the checkpoint's segment.
    `segment` is the step's segment in its batch: at 0 the LSTM state starts afresh.
    """
    step, stop = span
    while step < stop:
        epoch, first_batch, first_segment = schedule.position(step)
        streams = [
            shard.iter_batches(batch_size=schedule.local_batch, batch_format="pyarrow", prefetch_batches=2)
            for shard in shards
        ]
        batches = in_block_order(streams, schedule.local_batch)
        index = -1
        for index, batch in enumerate(batches):
            if index >= schedule.batches_per_epoch or step >= stop:
                break
            if index < first_batch:
                continue  # consumed before the checkpoint this run was restored from
            check_blocks(batch, schedule.batch_blocks(rank, index), rank, index)
            blocks_BL = blocks_tensor(batch, block_len, vocab_size, device)
            first = first_segment if index == first_batch else 0
            for i, (x_BT, y_BT) in enumerate(segments(blocks_BL.t(), bptt, first)):
                yield x_BT, y_BT, first + i
                step += 1
                if step >= stop:
                    return
        if schedule.position(step)[0] == epoch:
            raise RuntimeError(
                f"rank {rank}: the train shard ran out after {index} batches in epoch {epoch}, "
                f"expected {schedule.batches_per_epoch}; the dataset changed under the run"
            )
