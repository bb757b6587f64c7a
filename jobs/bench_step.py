"""Training words/second of LightRNN and the baselines, side by side on one random stream.

Models take turns, a few timed steps each per round, so drift on a noisy machine hits
them alike; the reported ratios are to the full softmax.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from lightrnn.config import MODEL_KINDS, ModelConfig
from lightrnn.model import LanguageModel, State, build_model, detach_state


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vocab", type=int, default=1_000_000, help="vocabulary size V")
    parser.add_argument("--hidden", type=int, default=256, help="LSTM width H (and embedding width)")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--models", default="lightrnn,full,adaptive", help=f"comma list of {', '.join(MODEL_KINDS)}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--bptt", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU)")
    parser.add_argument("--seed", type=int, default=0)


def _step(
    model: LanguageModel,
    optimizer: torch.optim.Optimizer,
    tokens_BT: torch.Tensor,
    targets_BT: torch.Tensor,
    state: State | None,
    device: str,
    bf16: bool,
) -> State | None:
    with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
        loss, state = model(tokens_BT, targets_BT, detach_state(state))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return detach_state(state)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> dict:
    kinds = [k.strip() for k in args.models.split(",") if k.strip()]
    for kind in kinds:
        if kind not in MODEL_KINDS:
            raise SystemExit(f"unknown model {kind!r}; choose from {', '.join(MODEL_KINDS)}")
    torch.manual_seed(args.seed)
    stream = torch.randint(0, args.vocab, (args.batch, args.bptt * (args.steps + 1) + 1), device=args.device)
    setups = {}
    for kind in kinds:
        config = ModelConfig(args.vocab, kind, args.hidden, args.hidden, args.layers, dropout=0.0)
        model = build_model(config).to(args.device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        state = _step(
            model, optimizer, stream[:, : args.bptt], stream[:, 1 : args.bptt + 1], None, args.device, args.bf16
        )
        setups[kind] = [model, optimizer, state, 0.0, 0]  # warmed up; seconds and words timed so far
        print(f"[{kind}] built and warmed up: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    for _ in range(args.rounds):
        for kind in kinds:
            model, optimizer, state, seconds, words = setups[kind]
            _sync(args.device)
            start = time.perf_counter()
            for i in range(1, args.steps + 1):
                x = stream[:, i * args.bptt : (i + 1) * args.bptt]
                y = stream[:, i * args.bptt + 1 : (i + 1) * args.bptt + 1]
                state = _step(model, optimizer, x, y, state, args.device, args.bf16)
            _sync(args.device)
            setups[kind][2:] = [state, seconds + time.perf_counter() - start, words + args.steps * x.numel()]
        gc.collect()
    words_per_s = {kind: setups[kind][4] / setups[kind][3] for kind in kinds}
    base = words_per_s.get("full")
    print(
        f"V={args.vocab:,} H={args.hidden} L={args.layers} batch {args.batch}x{args.bptt} on {args.device}"
        f"{' bf16' if args.bf16 else ''}; {args.rounds} rounds x {args.steps} steps"
    )
    print(f"{'model':<10}{'words/s':>14}{'vs full':>10}")
    for kind in kinds:
        rel = f"{words_per_s[kind] / base:>9.1f}x" if base else f"{'-':>10}"
        print(f"{kind:<10}{words_per_s[kind]:>14,.0f}{rel}")
    result = {
        "vocab": args.vocab,
        "hidden": args.hidden,
        "device": args.device,
        "bf16": args.bf16,
        "words_per_s": {k: round(v, 1) for k, v in words_per_s.items()},
    }
    if base:
        result["ratio_to_full"] = {k: round(v / base, 2) for k, v in words_per_s.items()}
    if args.device.startswith("cuda"):
        result["max_gpu_memory_bytes"] = torch.cuda.max_memory_allocated()
    return result
