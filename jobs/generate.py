"""Continue a prompt with a trained model, or list its top-k next words.

python -m jobs.generate --model runs/ptb-demo --prompt "the company said" --top-k 20 --temperature 0.8
python -m jobs.generate --model runs/ptb-demo --prompt "the company said" --next 10   # exact top-10, no sampling

Sampling: --top-k K draws among the exact K most probable words (LightRNN finds them
without the V-way distribution, `lightrnn.infer.topk_next_words`); --top-k 0 draws from
all V words (LightRNN at temperature 1 draws a row, then a column).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from lightrnn.infer import generate, topk_next_words
from lightrnn.vocab import tokenize
from pipeline.models import load_model_uri


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="export folder, s3://... (fsspec), runs:/... or models:/...")
    parser.add_argument("--prompt", default="", help="words to continue; read as the start of a line")
    parser.add_argument("--words", type=int, default=30, help="most words to generate (stops at <eos>)")
    parser.add_argument("--temperature", type=float, default=1.0, help="> 0; below 1 sharpens, above 1 flattens")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the K most probable words (0: all)")
    parser.add_argument("--samples", type=int, default=1, help="continuations to draw (seeds seed, seed+1, ...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--next", type=int, default=0, metavar="K", help="print the exact top-K next words instead")
    parser.add_argument("--lower", action="store_true", help="lower-case the prompt first")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of results")
    args = parser.parse_args(argv)
    if args.temperature <= 0 or args.top_k < 0 or args.words < 1 or args.samples < 1 or args.next < 0:
        parser.error("need --temperature > 0, --top-k >= 0, --words >= 1, --samples >= 1, --next >= 0")
    try:
        model, vocab = load_model_uri(args.model)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if max(args.top_k, args.next) > len(vocab):
        parser.error(f"--top-k / --next must be at most the vocabulary size, {len(vocab)}")
    prompt = args.prompt.lower() if args.lower else args.prompt
    result: dict = {"model": args.model, "prompt": prompt}
    if args.next:
        ids = [vocab.eos_id, *vocab.encode(tokenize(prompt)).tolist()]
        top = topk_next_words(model, torch.tensor([ids]), args.next)
        pairs = [(vocab.words[int(w)], float(lp)) for w, lp in zip(top.word_ids[0], top.log_probs[0], strict=True)]
        rows = (
            f", {int(top.rows_visited[0])} of {model.num_rows} rows searched" if model.config.kind == "lightrnn" else ""
        )
        print(f"[next] top {args.next} after {prompt!r}{rows}:")
        for word, lp in pairs:
            print(f"  {word:<20} p={math.exp(lp):.4f}  log p={lp:.3f}")
        result["next"] = [{"word": w, "log_prob": round(lp, 5)} for w, lp in pairs]
    else:
        texts = []
        for i in range(args.samples):
            words = generate(model, vocab, prompt, args.words, args.temperature, args.top_k, args.seed + i)
            texts.append(" ".join(words))
            print(f"{prompt} | {texts[-1]}".strip(), flush=True)
        result["samples"] = texts
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
