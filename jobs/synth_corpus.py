"""Write a synthetic Zipf corpus: `python -m jobs.synth_corpus --vocab 10000000 --tokens N --output URI`.

Every word appears at least once, so preparing it gives a vocabulary of exactly
--vocab words plus <unk> and <eos>.
"""

from __future__ import annotations

import argparse
import sys
import time

from pipeline.cluster import connect_ray
from pipeline.synth import write_corpus


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.synth_corpus", description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, required=True, help="distinct words V")
    p.add_argument("--tokens", type=int, required=True, help="tokens in all (>= V), not counting <eos>")
    p.add_argument("--output", required=True, help="folder URI for part-NNNNN.txt files")
    p.add_argument("--files", type=int, default=4, help="files, written in parallel")
    p.add_argument("--exponent", type=float, default=1.0, help="Zipf exponent (about 1 for natural text)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gzip", action="store_true", help="write .txt.gz")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint URL")
    args = p.parse_args(argv)
    connect_ray(args.num_cpus)
    t0 = time.perf_counter()
    so = {"endpoint_url": args.s3_endpoint} if args.s3_endpoint else {}
    uris = write_corpus(args.output, args.vocab, args.tokens, args.files, args.exponent, args.seed, args.gzip, so)
    print(
        f"wrote {len(uris)} files, {args.tokens:,} tokens over {args.vocab:,} words in {time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
