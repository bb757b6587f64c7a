"""Using a trained model: exact next-word top-k, sampling, and scoring text.

Shape legend as in `lightrnn.model`: B contexts, T time steps, R table rows, C table
columns, N rows visited in one block, K the k of top-k, A contexts still searching.

Exact top-k for LightRNN without the V-way distribution. log P(w) = log P_row(r) +
log P_col(c | r) and log P_col <= 0, so no word of row r can beat log P_row(r):

    rows by log P_row, descending:  r1  r2  r3 | r4 ...
    visit r1, r2, r3: one LSTM step each (fed the row vector), column softmax,
                      keep the best K words seen (empty cells skipped)
    stop before r4 as soon as log P_row(r4) <= the K-th best log P(w) so far

Rows are visited in blocks of 8, 16, 32, ... (one batched LSTM step per block), so a
peaked distribution costs a few rows and a flat one at most twice the rows needed.
For the full-softmax and adaptive baselines top-k is `topk` of their exact distribution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightrnn.model import LanguageModel, LightRNN, State
from lightrnn.train import EmptyStreamError, inference, log_probs_along, score_stream
from lightrnn.vocab import Vocabulary, tokenize

FIRST_BLOCK = 8  # rows in the first block of the search; each next block doubles
# float32 log_softmax can return log P_col a hair above 0 for a near-certain column; the
# stopping bound keeps this margin (nats) so the search stays exact
BOUND_SLACK = 1e-5


# -- top-k ---------------------------------------------------------------------------------


@dataclass
class TopK:
    log_probs: Tensor  # (B, K) descending
    word_ids: Tensor  # (B, K)
    state: State  # after the tokens read
    rows_visited: Tensor  # (B,) LightRNN rows whose columns were computed; V-way models: 0


def topk_next_words(model: LanguageModel, tokens_BT: Tensor, k: int, state: State | None = None) -> TopK:
    """The exact k most probable next words after each context, best first."""
    if not 1 <= k <= model.vocab_size:
        raise ValueError(f"k must be in 1..{model.vocab_size} (the vocabulary size), got {k}")
    with inference(model):
        if not isinstance(model, LightRNN):
            logp_BV, state = model.next_word_log_probs(tokens_BT, state)
            top = logp_BV.topk(k, dim=-1)
            return TopK(top.values, top.indices, state, torch.zeros(logp_BV.shape[0], dtype=torch.long))
        return _lightrnn_topk(model, tokens_BT, k, state)


def _lightrnn_topk(model: LightRNN, tokens_BT: Tensor, k: int, state: State | None) -> TopK:
    row_logp_BR, state = model.row_log_probs(tokens_BT, state)
    B, R = row_logp_BR.shape
    sorted_logp_BR, order_BR = row_logp_BR.sort(dim=-1, descending=True)
    table_RC = model.word_table()
    device = row_logp_BR.device
    best_logp_BK = torch.full((B, k), float("-inf"), device=device)
    best_ids_BK = torch.full((B, k), -1, dtype=torch.long, device=device)
    visited_B = torch.zeros(B, dtype=torch.long, device=device)
    active_B = torch.ones(B, dtype=torch.bool, device=device)
    start, block = 0, FIRST_BLOCK
    while start < R:
        idx_A = active_B.nonzero().squeeze(1)
        if idx_A.numel() == 0:
            break
        end = min(start + block, R)
        rows_AN = order_BR[idx_A, start:end]
        state_A = (state[0][:, idx_A], state[1][:, idx_A])
        col_logp_ANC = model.column_log_probs(state_A, rows_AN)
        cand_logp = (sorted_logp_BR[idx_A, start:end].unsqueeze(-1) + col_logp_ANC).flatten(1)
        cand_ids = table_RC[rows_AN].flatten(1)
        all_logp = torch.cat((best_logp_BK[idx_A], cand_logp), dim=1)
        all_ids = torch.cat((best_ids_BK[idx_A], cand_ids), dim=1)
        top = all_logp.topk(k, dim=1)
        best_logp_BK[idx_A] = top.values
        best_ids_BK[idx_A] = all_ids.gather(1, top.indices)
        visited_B[idx_A] = end
        if end < R:
            # no word of a row below can beat its row's log-probability
            bound_A = sorted_logp_BR[idx_A, end]
            active_B[idx_A] = bound_A + BOUND_SLACK > top.values[:, -1]
        start, block = end, block * 2
    return TopK(best_logp_BK, best_ids_BK, state, visited_B)


# -- sampling ------------------------------------------------------------------------------


def sample_next_words(
    model: LanguageModel,
    tokens_BT: Tensor,
    state: State | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, State]:
    """One next word per context, drawn from P(w)^(1/temperature), restricted to the top_k words if > 0.

    LightRNN at temperature 1 without top-k draws the row, then the column (one LSTM
    step), never building the V-way distribution. At other temperatures P^(1/t) does
    not factor into row and column parts, so the full distribution is computed.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    with inference(model):
        if top_k > 0:
            top = topk_next_words(model, tokens_BT, top_k, state)
            pick_B1 = torch.multinomial(F.softmax(top.log_probs / temperature, dim=-1), 1, generator=generator)
            return top.word_ids.gather(1, pick_B1).squeeze(1), top.state
        if isinstance(model, LightRNN) and temperature == 1.0:
            row_logp_BR, state = model.row_log_probs(tokens_BT, state)
            rows_B1 = torch.multinomial(row_logp_BR.exp(), 1, generator=generator)
            col_logp_BC = model.column_log_probs(state, rows_B1).squeeze(1)
            cols_B = torch.multinomial(col_logp_BC.exp(), 1, generator=generator).squeeze(1)
            return model.word_table()[rows_B1.squeeze(1), cols_B], state
        logp_BV, state = model.next_word_log_probs(tokens_BT, state)
        return torch.multinomial(F.softmax(logp_BV / temperature, dim=-1), 1, generator=generator).squeeze(1), state


def generate(
    model: LanguageModel,
    vocab: Vocabulary,
    prompt: str,
    max_words: int = 20,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    lower: bool = False,
) -> list[str]:
    """Words continuing `prompt` (read after an `<eos>`, as a new line), until `<eos>` or `max_words`."""
    generator = torch.Generator().manual_seed(seed)
    ids = [vocab.eos_id, *vocab.encode(tokenize(prompt, lower)).tolist()]
    tokens_BT = torch.tensor([ids])
    state: State | None = None
    words: list[str] = []
    for _ in range(max_words):
        next_B, state = sample_next_words(model, tokens_BT, state, temperature, top_k, generator)
        if int(next_B[0]) == vocab.eos_id:
            break
        words.append(vocab.words[int(next_B[0])])
        tokens_BT = next_B.view(1, 1)
    return words


# -- scoring -------------------------------------------------------------------------------


@dataclass
class TextScore:
    token_log_probs: np.ndarray  # (N,) every token, `<eos>` closing each line included
    line_log_probs: np.ndarray  # (lines,) sum over each line's tokens and its `<eos>`
    line_tokens: np.ndarray  # (lines,) tokens scored per line (words + 1)

    @property
    def tokens(self) -> int:
        return int(self.token_log_probs.shape[0])

    @property
    def nll(self) -> float:
        return -float(self.token_log_probs.sum())

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens)


def score_lines(
    model: LanguageModel,
    vocab: Vocabulary,
    lines: Sequence[str],
    batch_size: int = 10,
    bptt: int = 35,
    lower: bool = False,
) -> TextScore:
    """Score a text as `evaluate` does (`<eos>` after each line) and split the log-probs by line.

    The state runs on from one line into the next within each of the `batch_size`
    columns, so a line's log-probability is conditioned on the text before it; use
    `sentence_log_probs` for lines scored on their own.
    """
    pieces = [vocab.encode_line(line, lower) for line in lines]
    if not pieces:
        raise EmptyStreamError("no lines to score")
    lengths = np.array([p.shape[0] for p in pieces], dtype=np.int64)
    logp_N = score_stream(model, np.concatenate(pieces), vocab.eos_id, batch_size, bptt)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    return TextScore(logp_N, np.add.reduceat(logp_N, starts), lengths)


def sentence_log_probs(
    model: LanguageModel,
    vocab: Vocabulary,
    sentences: Sequence[str],
    batch_size: int = 32,
    bptt: int = 35,
    lower: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """log P of each sentence on its own (fresh state, read after `<eos>`, its closing `<eos>` scored).

    Returns (log_probs, tokens), both (S,). A sentence's score does not depend on the
    others in the batch: padding comes after its last target and is not counted.
    """
    encoded = [vocab.encode_line(s, lower) for s in sentences]
    log_probs = np.zeros(len(encoded), dtype=np.float64)
    lengths = np.array([e.shape[0] for e in encoded], dtype=np.int64)
    for lo in range(0, len(encoded), batch_size):
        chunk = encoded[lo : lo + batch_size]
        longest = max(e.shape[0] for e in chunk)
        seq_BT1 = torch.full((len(chunk), longest + 1), vocab.eos_id, dtype=torch.long)
        for b, e in enumerate(chunk):
            seq_BT1[b, 1 : 1 + e.shape[0]] = torch.from_numpy(e.astype(np.int64))
        mask_BT = torch.arange(longest)[None, :] < torch.from_numpy(lengths[lo : lo + len(chunk)])[:, None]
        logp_BT = log_probs_along(model, seq_BT1, bptt)
        log_probs[lo : lo + len(chunk)] = (logp_BT * mask_BT).sum(dim=1).numpy()
    return log_probs, lengths
