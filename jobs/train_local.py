"""Train one model in a single process and report standard perplexity.

python -m jobs.train_local --config ptb                     # LightRNN on Penn Treebank
python -m jobs.train_local --config ptb --model full        # full-softmax baseline, same budget
python -m jobs.train_local --config tiny --set train.max_steps=10 --json
python -m jobs.train_local --config ptb --budget-seconds 120   # 2 CPU minutes, whatever the step count
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

from jobs.configs import PRESETS, RunConfig, get_preset
from jobs.time_budget import CLOCKS, train_for_time
from lightrnn.config import MODEL_KINDS
from lightrnn.corpus import count_words, encode_file
from lightrnn.export import save_model
from lightrnn.model import build_model
from lightrnn.phases import PhaseReport, initial_allocation, train_with_reallocation
from lightrnn.train import StepLog, evaluate
from lightrnn.vocab import Vocabulary


def run(config: RunConfig, out_dir: str | None = None, budget_seconds: float = 0.0, clock: str = "cpu") -> dict:
    """Build the vocabulary, train, evaluate valid and test; return the figures.

    `budget_seconds` > 0 trains for that many seconds of `clock` (`jobs.time_budget`) instead of
    the configured epochs or steps.
    """
    torch.manual_seed(config.train.seed)
    t0 = time.perf_counter()
    vocab = Vocabulary.build(
        count_words([config.data.train], config.data.lower), config.data.max_vocab, config.data.min_count
    )
    streams = {
        split: encode_file(getattr(config.data, split), vocab, config.data.lower)
        for split in ("train", "valid", "test")
    }
    print(
        f"[data] vocabulary {len(vocab):,} words; tokens train {len(streams['train']):,} "
        f"valid {len(streams['valid']):,} test {len(streams['test']):,} ({time.perf_counter() - t0:.1f}s)",
        flush=True,
    )
    model_config = dataclasses.replace(config.model, vocab_size=len(vocab))
    allocation = (
        initial_allocation(vocab.counts, config.realloc, config.train.seed) if model_config.kind == "lightrnn" else None
    )
    model = build_model(model_config, allocation).to(config.train.device)
    n_params = sum(p.numel() for p in model.parameters())
    core_params = sum(p.numel() for p in model.core.parameters())  # the LSTM; the rest is embeddings + heads
    print(f"[model] {model_config.kind}: {n_params:,} parameters", flush=True)

    def valid_ppl(m: torch.nn.Module) -> float:
        ppl = evaluate(m, streams["valid"], vocab.eos_id, config.train.eval_batch_size, config.train.bptt).ppl
        print(f"[valid] ppl {ppl:.2f}", flush=True)
        return ppl

    def log(entry: StepLog) -> None:
        print(
            f"[train] step {entry.step:>6} epoch {entry.epoch:5.2f} loss {entry.loss:.3f} "
            f"lr {entry.lr:.2e} {entry.words_per_s:,.0f} words/s",
            flush=True,
        )

    def phase_done(report: PhaseReport) -> None:
        if report.realloc:
            r = report.realloc
            print(
                f"[realloc] after phase {report.phase}: {r['words_moved']:,} of {len(vocab):,} words moved, "
                f"cost {r['cost_before']:.4g} -> {r['cost_after']:.4g} ({r['seconds']:.1f}s solve, {r['method']})",
                flush=True,
            )

    realloc = dataclasses.replace(config.realloc, rounds=config.rounds)
    hooks = {"valid_fn": valid_ppl, "on_log": log, "on_phase": phase_done}
    if budget_seconds > 0:
        result = train_for_time(model, streams["train"], config.train, realloc, budget_seconds, clock, **hooks)
    else:
        result = train_with_reallocation(model, streams["train"], config.train, realloc, **hooks)
    test = evaluate(model, streams["test"], vocab.eos_id, config.train.eval_batch_size, config.train.bptt)
    summary = {
        "config": config.name,
        "model": model_config.kind,
        "params": n_params,
        "embed_head_bytes": (n_params - core_params) * 4,  # fp32
        "steps": result.steps,
        "budget_seconds": budget_seconds,
        "clock": clock if budget_seconds > 0 else "wall",  # the clock of train_seconds and realloc_seconds
        "train_words": result.words,
        "train_seconds": round(result.train_seconds, 1),
        "realloc_rounds": realloc.rounds,
        "realloc_seconds": round(result.realloc_seconds, 1),
        "words_moved": [p.realloc["words_moved"] for p in result.phases if p.realloc],
        "valid_ppl_per_phase": [round(p.valid_ppl, 2) for p in result.phases if p.valid_ppl is not None],
        "words_per_s": round(result.words_per_s, 1),
        "final_train_loss": round(result.phases[-1].train_loss, 4),
        "valid_ppl": round(result.phases[-1].valid_ppl, 2),
        "test_ppl": round(test.ppl, 2),
        "test_tokens": test.tokens,
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    if out_dir:
        summary["saved_to"] = str(save_model(out_dir, model, vocab))
    print(
        f"[done] {model_config.kind} on {config.name}: test ppl {test.ppl:.2f} over {test.tokens:,} tokens, "
        f"valid ppl {summary['valid_ppl']}, {result.steps} steps in {result.train_seconds:.0f}s "
        f"({result.words_per_s:,.0f} words/s)" + (f"; saved to {out_dir}" if out_dir else ""),
        flush=True,
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.train_local", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="ptb", help=f"preset: {', '.join(PRESETS)}")
    parser.add_argument("--model", choices=MODEL_KINDS, help="override model.kind")
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override a config field"
    )
    parser.add_argument(
        "--budget-seconds", type=float, default=0.0, help="train for this many seconds instead of epochs or steps"
    )
    parser.add_argument(
        "--clock", choices=tuple(CLOCKS), default="cpu", help="the budget's clock: process CPU time or wall time"
    )
    parser.add_argument("--out", help="directory to save the trained model in")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of results")
    args = parser.parse_args(argv)
    overrides = list(args.set) + ([f"model.kind={args.model}"] if args.model else [])
    try:
        config = get_preset(args.config).with_overrides(overrides)
    except ValueError as e:
        parser.error(str(e))
    if args.budget_seconds < 0:
        parser.error(f"--budget-seconds must be > 0 (or 0 for the configured epochs), got {args.budget_seconds}")
    summary = run(config, args.out, args.budget_seconds, args.clock)
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
