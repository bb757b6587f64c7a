"""Score a text file with a trained model: perplexity and per-line log-probabilities.

python -m jobs.score --model runs/ptb-demo --input data/ptb/ptb.test.txt
python -m jobs.score --model runs:/RUN_ID/model --input notes.txt --per-line - --independent
python -m jobs.score --model s3://bucket/models/ptb --input data/ptb/ptb.test.txt --json

By default the text is read as `lightrnn.train.evaluate` reads it (`<eos>` after every
line, 10 columns, 35-word segments, state carried), so the perplexity equals the one
training reports; a line's log-probability is then conditioned on the text before it
in its column. --independent scores every line on its own from a fresh state (as the
MLflow model does); the perplexity is then that of the lines taken one by one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

from lightrnn.corpus import read_lines
from lightrnn.infer import score_lines, sentence_log_probs
from pipeline.models import load_model_uri


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.score", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="export folder, s3://... (fsspec), runs:/... or models:/...")
    parser.add_argument("--input", required=True, help="text file, one sentence or paragraph per line (.gz/.xz ok)")
    parser.add_argument("--batch-size", type=int, default=10, help="parallel columns, as evaluate (1: one stream)")
    parser.add_argument("--bptt", type=int, default=35, help="words per segment, as evaluate")
    parser.add_argument("--independent", action="store_true", help="score every line on its own, fresh state")
    parser.add_argument("--lower", action="store_true", help="lower-case the text first")
    parser.add_argument("--per-line", metavar="PATH", help="write 'log_prob<TAB>tokens' per line to PATH (- stdout)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of results")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.bptt < 1:
        parser.error("--batch-size and --bptt must be >= 1")
    started = time.perf_counter()
    try:
        model, vocab = load_model_uri(args.model)
        lines = [line.rstrip("\n") for line in read_lines(args.input)]
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not lines:
        print(f"error: {args.input} is empty", file=sys.stderr)
        return 1
    if args.independent:
        line_logp, line_tokens = sentence_log_probs(model, vocab, lines, bptt=args.bptt, lower=args.lower)
    else:
        scored = score_lines(model, vocab, lines, args.batch_size, args.bptt, args.lower)
        line_logp, line_tokens = scored.line_log_probs, scored.line_tokens
    tokens = int(line_tokens.sum())
    ppl = math.exp(-float(line_logp.sum()) / tokens)
    if args.per_line:
        text = "".join(f"{lp:.4f}\t{n}\n" for lp, n in zip(line_logp, line_tokens, strict=True))
        if args.per_line == "-":
            sys.stdout.write(text)
        else:
            with open(args.per_line, "w", encoding="utf-8") as f:
                f.write(text)
    unk = int(np.count_nonzero(np.concatenate([vocab.encode_line(x, args.lower) for x in lines]) == vocab.unk_id))
    seconds = time.perf_counter() - started
    mode = "lines on their own" if args.independent else f"{args.batch_size} columns x {args.bptt}"
    print(
        f"[score] ppl {ppl:.2f} over {tokens:,} tokens ({len(lines):,} lines, {unk:,} <unk>; {mode}) "
        f"with {model.config.kind} from {args.model} in {seconds:.1f}s",
        flush=True,
    )
    if args.json:
        result = {
            "model": args.model,
            "kind": model.config.kind,
            "ppl": round(ppl, 4),
            "log_prob": float(line_logp.sum()),
            "tokens": tokens,
            "lines": len(lines),
            "unk_tokens": unk,
            "independent": args.independent,
            "seconds": round(seconds, 2),
        }
        print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
