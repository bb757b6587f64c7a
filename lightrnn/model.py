"""LightRNN (Li, Qin, Yang, Liu: "LightRNN: Memory and Computation-Efficient Recurrent
Neural Networks", NIPS 2016, arXiv 1610.09893) and the shared LSTM language-model API.

Shape legend: B batch, T time steps (words), D embedding width, H hidden width,
L LSTM layers, V vocabulary, R table rows, C table columns.

One LSTM reads the row and then the column vector of every word, as the official
CNTK implementation does, so each word costs two steps of the same recurrence:

    input:   r(x1) c(x1) r(x2) c(x2) ... r(xT) c(xT) | r(yT)
    output:   h0    h1    h2    h3   ...  h2T-2 h2T-1 | h2T
    h after c(xt) predicts r(yt)          (row head, softmax over non-empty rows)
    h after r(yt) predicts c(yt)          (column head, softmax over that row's
                                           occupied cells; r(yt) = r(x(t+1)))

The carried state is the state after c(xT): it summarises whole words only, so
segments chain exactly. The extra step r(yT) serves the last column prediction.

`ModelConfig.lightrnn_input = "joint"` reads each word in one step instead, from its row
and column vectors side by side, and gives the column head the target row through a
small layer mixing the LSTM output with that row's (input) vector:

    input:   [r(x1); c(x1)]  [r(x2); c(x2)] ...  [r(xT); c(xT)]
    output:        h1              h2      ...        hT
    ht predicts r(yt)                            (row head)
    tanh(W [ht; r(yt)] + b) predicts c(yt)       (column head)

Half the LSTM steps per word, and the carried state is again the state after the last
word. In both modes

    log P(w | ctx) = log P_row(r(w) | ctx) + log P_col(c(w) | ctx, r(w))

Empty cells (R * C > V) and empty rows are masked out, so P sums to one over
exactly the V words.

Precision: the LSTM runs in the dtype `set_lstm_dtype` chose (float32 unless told),
with autocast switched off around it; its outputs and the carried (h, c) come back in
float32 whatever that dtype is, and the heads follow the caller's autocast. Autocast's own rule for
the cuDNN LSTM casts to float16 even under `dtype=torch.bfloat16` (ATen's
`cudnn/AutocastRNN.cpp` hard-codes `kHalf`), and CPU autocast runs it in bfloat16: either
would carry the state in 16 bits across every segment of a block.

Input checks: `check=True` (the default) reads the ids to check their range, a host sync
on a GPU; callers that checked their data where they read it (the training loops do, per
block on the host) pass `check=False`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lightrnn.allocation import Allocation, AllocationError
from lightrnn.config import ModelConfig

State = tuple[Tensor, Tensor]  # LSTM (h, c), each (L, B, H), float32
LSTM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def check_tokens(tokens: Tensor, vocab_size: int, name: str = "tokens") -> Tensor:
    """Return `tokens` as int64, or raise if they are not in-range word ids."""
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.is_complex():
        raise ValueError(f"{name} must be integer word ids, got dtype {tokens.dtype}")
    if tokens.dim() != 2:
        raise ValueError(f"{name} must be a (batch, time) tensor, got shape {tuple(tokens.shape)}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        bad = tokens[(tokens < 0) | (tokens >= vocab_size)][0]
        raise ValueError(
            f"{name} holds id {int(bad)}, outside the vocabulary 0..{vocab_size - 1}: "
            f"encode text with the vocabulary the model was built for"
        )
    return tokens.long()


def check_shifted(tokens_BT: Tensor, targets_BT: Tensor) -> None:
    """Raise unless `targets_BT` is `tokens_BT` shifted by one, as in a stream."""
    if tokens_BT.shape != targets_BT.shape:
        raise ValueError(f"tokens {tuple(tokens_BT.shape)} and targets {tuple(targets_BT.shape)} differ in shape")
    if not torch.equal(targets_BT[:, :-1], tokens_BT[:, 1:]):
        raise ValueError("targets must be the tokens shifted by one (targets[:, t] == tokens[:, t + 1])")


def detach_state(state: State | None) -> State | None:
    """Cut the graph between truncated-BPTT segments, keeping the values."""
    return None if state is None else (state[0].detach(), state[1].detach())


class LSTMCore(nn.Module):
    """Dropout -> multi-layer LSTM -> dropout; the recurrence every model here shares.

    The LSTM computes in `lstm_dtype` with autocast off (see the module docstring); its
    weights stay float32 and are cast per call when the dtype differs, so the optimizer
    updates float32 weights. Its outputs and state come back in float32.
    """

    def __init__(self, config: ModelConfig, input_dim: int | None = None) -> None:
        super().__init__()
        self.lstm = nn.LSTM(
            input_dim or config.embed_dim,
            config.hidden_dim,
            config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.drop = nn.Dropout(config.dropout)
        self.lstm_dtype = torch.float32

    def forward(self, x_BTD: Tensor, state: State | None) -> tuple[Tensor, State]:
        dtype = self.lstm_dtype
        with torch.autocast(x_BTD.device.type, enabled=False):
            x_BTD = self.drop(x_BTD).to(dtype)
            if state is not None:
                state = (state[0].to(dtype), state[1].to(dtype))
            if self.lstm.weight_ih_l0.dtype == dtype:
                h_BTH, (h, c) = self.lstm(x_BTD, state)
            else:  # cast copies of the weights, differentiable back to the float32 ones
                weights = {name: w.to(dtype) for name, w in self.lstm.named_parameters()}
                h_BTH, (h, c) = functional_call(self.lstm, weights, (x_BTD, state))
        # back in the weights' dtype (float32): the heads follow the caller's autocast from there
        out_dtype = self.lstm.weight_ih_l0.dtype
        return self.drop(h_BTH.to(out_dtype)), (h.to(out_dtype), c.to(out_dtype))


def set_lstm_dtype(model: nn.Module, dtype: str | torch.dtype) -> None:
    """Run every LSTM of `model` in `dtype` (a name in LSTM_DTYPES or a torch dtype)."""
    if isinstance(dtype, str):
        if dtype not in LSTM_DTYPES:
            raise ValueError(f"LSTM dtype must be one of {', '.join(LSTM_DTYPES)}; got {dtype!r}")
        dtype = LSTM_DTYPES[dtype]
    for module in model.modules():
        if isinstance(module, LSTMCore):
            module.lstm_dtype = dtype


class LanguageModel(nn.Module):
    """What every model here offers: a training loss and exact next-word distributions."""

    config: ModelConfig

    def forward(
        self, tokens_BT: Tensor, targets_BT: Tensor, state: State | None = None, *, check: bool = True
    ) -> tuple[Tensor, State]:
        """Mean negative log-likelihood of `targets_BT` given `tokens_BT`, and the carried state."""
        logp_BT, state = self.target_log_probs(tokens_BT, targets_BT, state, check=check)
        return -logp_BT.mean(), state

    def target_log_probs(
        self, tokens_BT: Tensor, targets_BT: Tensor, state: State | None = None, *, check: bool = True
    ) -> tuple[Tensor, State]:
        """log P(targets[:, t] | tokens[:, :t+1], state) for every position: (B, T).

        `check=False` skips reading the ids (range, shift): for data checked where it was read.
        """
        raise NotImplementedError

    def next_word_log_probs(self, tokens_BT: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """Exact log-distribution over all V words for the word after each sequence: (B, V)."""
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size


class LightRNN(LanguageModel):
    """Words as (row, column) pairs of a shared R x C table; see the module docstring."""

    def __init__(self, config: ModelConfig, allocation: Allocation) -> None:
        super().__init__()
        if config.kind != "lightrnn":
            raise ValueError(f"LightRNN needs config.kind='lightrnn', got {config.kind!r}")
        if allocation.vocab_size != config.vocab_size:
            raise AllocationError(
                f"allocation covers {allocation.vocab_size} words but the model's vocabulary has {config.vocab_size}"
            )
        self.config = config
        self.num_rows, self.num_cols = allocation.num_rows, allocation.num_cols
        self.row_embed = nn.Embedding(self.num_rows, config.embed_dim)
        self.col_embed = nn.Embedding(self.num_cols, config.embed_dim)
        self.joint = config.lightrnn_input == "joint"
        self.core = LSTMCore(config, input_dim=2 * config.embed_dim if self.joint else None)
        self.row_head = nn.Linear(config.hidden_dim, self.num_rows)
        self.col_head = nn.Linear(config.hidden_dim, self.num_cols)
        if self.joint:  # the column head's view of the target row: tanh(W [h; r(y)] + b)
            self.col_given_row = nn.Linear(config.hidden_dim + config.embed_dim, config.hidden_dim)
        if config.tie_weights:  # one vector per row and per column, read and predicted; needs D == H
            self.row_head.weight = self.row_embed.weight
            self.col_head.weight = self.col_embed.weight
        # The word table lives in the allocation (allocation.parquet beside every checkpoint and
        # export); these lookups are rebuilt from it, so they are buffers (moved with .to(device))
        # but not part of the state dict. int32: at V = 10M the lookup is 80 MB instead of 160 MB.
        self.register_buffer("row_of", torch.empty(config.vocab_size, dtype=torch.int32), persistent=False)
        self.register_buffer("col_of", torch.empty(config.vocab_size, dtype=torch.int32), persistent=False)
        self.register_buffer(
            "occupied_RC", torch.empty(self.num_rows, self.num_cols, dtype=torch.bool), persistent=False
        )
        self._word_table_RC: Tensor | None = None
        self.set_allocation(allocation)
        nn.init.uniform_(self.row_embed.weight, -0.1, 0.1)
        nn.init.uniform_(self.col_embed.weight, -0.1, 0.1)

    # -- the word table ---------------------------------------------------------------

    def set_allocation(self, allocation: Allocation) -> None:
        """Move words to new cells (after a reallocation); the table shape cannot change."""
        if (allocation.num_rows, allocation.num_cols) != (self.num_rows, self.num_cols):
            raise AllocationError(
                f"allocation table is {allocation.num_rows} x {allocation.num_cols}, the model's is "
                f"{self.num_rows} x {self.num_cols}"
            )
        if allocation.vocab_size != self.config.vocab_size:
            raise AllocationError(
                f"allocation covers {allocation.vocab_size} words, model has {self.config.vocab_size}"
            )
        with torch.no_grad():
            # torch.tensor copies: arrays read from Parquet can be read-only
            self.row_of.copy_(torch.tensor(allocation.row_of))
            self.col_of.copy_(torch.tensor(allocation.col_of))
            self.occupied_RC.copy_(torch.from_numpy(allocation.occupied()))
        self._word_table_RC = None

    def allocation(self) -> Allocation:
        return Allocation(self.row_of.cpu().numpy(), self.col_of.cpu().numpy(), self.num_rows, self.num_cols)

    def word_table(self) -> Tensor:
        """(R, C) int64 word id in every cell, -1 where the cell is empty; kept until the allocation changes."""
        table = self._word_table_RC
        if table is None or table.device != self.row_of.device:
            flat = torch.full((self.num_rows * self.num_cols,), -1, dtype=torch.long, device=self.row_of.device)
            flat[self.row_of.long() * self.num_cols + self.col_of.long()] = torch.arange(
                self.vocab_size, device=flat.device
            )
            table = self._word_table_RC = flat.view(self.num_rows, self.num_cols)
        return table

    # -- the recurrence ---------------------------------------------------------------

    def _inputs(self, tokens_BT: Tensor) -> Tensor:
        """(B, T) words -> the LSTM's inputs: (B, 2T, D) r(x1), c(x1), r(x2), ... interleaved,
        or (B, T, 2D) [r(xt); c(xt)] joint."""
        rows_BTD = self.row_embed(self.row_of[tokens_BT])
        cols_BTD = self.col_embed(self.col_of[tokens_BT])
        if self.joint:
            return torch.cat((rows_BTD, cols_BTD), dim=-1)
        B, T, D = rows_BTD.shape
        return torch.stack((rows_BTD, cols_BTD), dim=2).reshape(B, 2 * T, D)

    def _given_row(self, h_NH: Tensor, rows_N: Tensor) -> Tensor:
        """Joint mode: the column head's input for LSTM outputs `h` and target rows `rows`."""
        return torch.tanh(self.col_given_row(torch.cat((h_NH, self.row_embed(rows_N)), dim=-1)))

    def head_inputs(
        self, tokens_BT: Tensor, targets_BT: Tensor, state: State | None = None, *, check: bool = True
    ) -> tuple[Tensor, Tensor, State]:
        """Hidden states feeding the row head and the column head for every target.

        Returns (h_row_BTH, h_col_BTH, state): h_row[:, t] predicts r(y_t), h_col[:, t]
        predicts c(y_t) given r(y_t). Cost accumulation for reallocation sums these.
        """
        if check:
            tokens_BT = check_tokens(tokens_BT, self.vocab_size)
            targets_BT = check_tokens(targets_BT, self.vocab_size, "targets")
            if not self.joint:
                # the column step after r(x[t+1]) predicts c(y[t]); that is only right in a stream
                check_shifted(tokens_BT, targets_BT)
        h_BXH, state = self.core(self._inputs(tokens_BT), state)  # X = T joint, 2T interleaved
        if self.joint:
            return h_BXH, self._given_row(h_BXH, self.row_of[targets_BT]), state
        h_B2TH = h_BXH
        last_row_B1D = self.row_embed(self.row_of[targets_BT[:, -1:]])
        h_last_B1H, _ = self.core(last_row_B1D, state)  # the r(yT) step; state stays after c(xT)
        h_row_BTH = h_B2TH[:, 1::2]
        h_col_BTH = torch.cat((h_B2TH[:, 2::2], h_last_B1H), dim=1)
        return h_row_BTH, h_col_BTH, state

    def _masked_row_logits(self, h_row: Tensor) -> Tensor:
        logits = self.row_head(h_row)
        empty_row = ~self.occupied_RC.any(dim=1)  # (R,) only when the table has spare rows
        return logits.masked_fill(empty_row, torch.finfo(logits.dtype).min)

    def _masked_col_logits(self, h_col: Tensor, occupied: Tensor) -> Tensor:
        logits = self.col_head(h_col)
        # finfo.min instead of -inf: a fully empty row then yields finite junk, not NaN
        return logits.masked_fill(~occupied, torch.finfo(logits.dtype).min)

    # -- the two softmaxes, separately (inference: top-k, sampling) ---------------------

    def row_log_probs(self, tokens_BT: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """log P_row of the next word's row after `tokens_BT`: (B, R), -inf for empty rows; and the state."""
        tokens_BT = check_tokens(tokens_BT, self.vocab_size)
        h_BXH, state = self.core(self._inputs(tokens_BT), state)
        row_logp_BR = F.log_softmax(self._masked_row_logits(h_BXH[:, -1]).float(), dim=-1)
        return row_logp_BR.masked_fill(~self.occupied_RC.any(dim=1), float("-inf")), state

    def column_log_probs(self, state: State, rows_BN: Tensor) -> Tensor:
        """log P_col(c | r) for N rows per context: (B, N, C), -inf on empty cells.

        P_col depends on the row read: one LSTM step from each context's `state` (the state
        after its last word, as `row_log_probs` returns it), fed each row's vector, or in
        joint mode the last layer's output in `state` mixed with each row's vector; only the
        rows asked for are computed.
        """
        B, N = rows_BN.shape
        if self.joint:
            h_BNH = state[0][-1].unsqueeze(1).expand(B, N, -1)
            h_col_BNH = self._given_row(h_BNH, rows_BN)
        else:
            x_BN1D = self.row_embed.weight[rows_BN].reshape(B * N, 1, -1)
            state_rows = (state[0].repeat_interleave(N, dim=1), state[1].repeat_interleave(N, dim=1))
            h_BN1H, _ = self.core(x_BN1D, state_rows)
            h_col_BNH = h_BN1H.view(B, N, -1)
        occupied_BNC = self.occupied_RC[rows_BN]
        col_logits_BNC = self._masked_col_logits(h_col_BNH, occupied_BNC)
        return F.log_softmax(col_logits_BNC.float(), dim=-1).masked_fill(~occupied_BNC, float("-inf"))

    def target_log_probs(
        self, tokens_BT: Tensor, targets_BT: Tensor, state: State | None = None, *, check: bool = True
    ) -> tuple[Tensor, State]:
        h_row_BTH, h_col_BTH, state = self.head_inputs(tokens_BT, targets_BT, state, check=check)
        targets_BT = targets_BT.long()
        rows_BT, cols_BT = self.row_of[targets_BT].long(), self.col_of[targets_BT].long()
        row_logits_BTR = self._masked_row_logits(h_row_BTH)
        col_logits_BTC = self._masked_col_logits(h_col_BTH, self.occupied_RC[rows_BT])
        # two small softmaxes; a (B, T, V) tensor is never built
        row_logp = -F.cross_entropy(row_logits_BTR.flatten(0, 1).float(), rows_BT.flatten(), reduction="none")
        col_logp = -F.cross_entropy(col_logits_BTC.flatten(0, 1).float(), cols_BT.flatten(), reduction="none")
        return (row_logp + col_logp).view_as(rows_BT), state

    def next_word_log_probs(self, tokens_BT: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        row_logp_BR, state = self.row_log_probs(tokens_BT, state)
        B, R = row_logp_BR.shape
        all_rows_BR = torch.arange(R, device=row_logp_BR.device).expand(B, R)
        cell_logp = (row_logp_BR.unsqueeze(-1) + self.column_log_probs(state, all_rows_BR)).view(B, -1)
        return cell_logp[:, self.row_of.long() * self.num_cols + self.col_of.long()], state


class _WordEmbeddingLM(LanguageModel):
    """What both baselines share: one input vector per word, then the LSTM core."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim)
        self.core = LSTMCore(config)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def _hidden(self, tokens_BT: Tensor, state: State | None, check: bool = True) -> tuple[Tensor, State]:
        if check:
            tokens_BT = check_tokens(tokens_BT, self.vocab_size)
        return self.core(self.embed(tokens_BT), state)


class FullSoftmaxLM(_WordEmbeddingLM):
    """The ordinary LSTM language model: V input vectors and a V-way softmax."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.head = nn.Linear(config.hidden_dim, config.vocab_size)
        if config.tie_weights:  # Press & Wolf 2017 / Inan et al. 2017; needs D == H
            self.head.weight = self.embed.weight

    def target_log_probs(
        self, tokens_BT: Tensor, targets_BT: Tensor, state: State | None = None, *, check: bool = True
    ) -> tuple[Tensor, State]:
        if check:
            targets_BT = check_tokens(targets_BT, self.vocab_size, "targets")
        h_BTH, state = self._hidden(tokens_BT, state, check)
        logits_BTV = self.head(h_BTH).float()
        logp = -F.cross_entropy(logits_BTV.flatten(0, 1), targets_BT.flatten(), reduction="none")
        return logp.view_as(targets_BT), state

    def next_word_log_probs(self, tokens_BT: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        h_BTH, state = self._hidden(tokens_BT, state)
        return F.log_softmax(self.head(h_BTH[:, -1]).float(), dim=-1), state


class AdaptiveSoftmaxLM(_WordEmbeddingLM):
    """LSTM with an adaptive softmax head (Grave et al. 2017); word ids must be frequency-ordered."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.head = nn.AdaptiveLogSoftmaxWithLoss(
            config.hidden_dim, config.vocab_size, list(config.resolved_cutoffs()), div_value=4.0
        )

    def target_log_probs(
        self, tokens_BT: Tensor, targets_BT: Tensor, state: State | None = None, *, check: bool = True
    ) -> tuple[Tensor, State]:
        if check:
            targets_BT = check_tokens(targets_BT, self.vocab_size, "targets")
        h_BTH, state = self._hidden(tokens_BT, state, check)
        out = self.head(h_BTH.flatten(0, 1).float(), targets_BT.flatten())
        return out.output.view_as(targets_BT), state

    def next_word_log_probs(self, tokens_BT: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        h_BTH, state = self._hidden(tokens_BT, state)
        return self.head.log_prob(h_BTH[:, -1].float()), state


def build_model(config: ModelConfig, allocation: Allocation | None = None) -> LanguageModel:
    """The model `config.kind` names; LightRNN needs an allocation (random if None, seed 0)."""
    if config.vocab_size < 2:
        raise ValueError(f"set config.vocab_size (from the vocabulary) before building; got {config.vocab_size}")
    if config.kind == "lightrnn":
        return LightRNN(config, allocation if allocation is not None else Allocation.random(config.vocab_size))
    if allocation is not None:
        raise ValueError(f"an allocation only applies to kind='lightrnn', not {config.kind!r}")
    if config.kind == "full":
        return FullSoftmaxLM(config)
    return AdaptiveSoftmaxLM(config)
