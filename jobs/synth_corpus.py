"""Write a synthetic Zipf corpus: `python -m jobs.synth_corpus --distinct 20000000 --tokens N --output URI`.

Every one of the --distinct words appears at least once, so preparing it without
--max-vocab gives exactly --distinct words plus <unk> and <eos>; with --max-vocab below
--distinct the rarest are trimmed. --format parquet writes documents in a `text` column.
With --valid-files / --test-files the last files go to OUTPUT/valid/ and OUTPUT/test/, the
others to OUTPUT/train/. The `clueweb-sim` configuration reads this corpus:

    python -m jobs.synth_corpus --distinct 20000000 --tokens 330000000 --files 66 --valid-files 1 \
        --test-files 1 --format parquet --output runs/clueweb-sim-corpus

    python -m jobs.synth_corpus --distinct 1000000 --tokens 50000000 --files 16 --output /tmp/zipf
    python -m jobs.synth_corpus --distinct 20000000 --tokens 300000000 --files 64 --format parquet \\
        --output s3://corpus/zipf --s3-endpoint http://127.0.0.1:5555
"""

from __future__ import annotations

import argparse
import sys
import time

from pipeline.cluster import connect_ray
from pipeline.synth import FORMATS, write_corpus


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.synth_corpus", description=__doc__.splitlines()[0])
    p.add_argument("--distinct", type=int, required=True, help="distinct words D, each written at least once")
    p.add_argument("--tokens", type=int, required=True, help="tokens in all (>= D), not counting <eos>")
    p.add_argument("--output", required=True, help="folder URI for the part-NNNNN files")
    p.add_argument("--files", type=int, default=4, help="files, written in parallel")
    p.add_argument("--valid-files", type=int, default=0, help="of the files, how many go to OUTPUT/valid/")
    p.add_argument("--test-files", type=int, default=0, help="of the files, how many go to OUTPUT/test/")
    p.add_argument("--format", choices=FORMATS, default="text", help="text lines or Parquet documents")
    p.add_argument("--exponent", type=float, default=1.0, help="Zipf exponent (about 1 for natural text)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gzip", action="store_true", help="text: write .txt.gz")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint URL")
    args = p.parse_args(argv)
    so = {"endpoint_url": args.s3_endpoint} if args.s3_endpoint else {}
    connect_ray(args.num_cpus)
    t0 = time.perf_counter()
    try:
        uris = write_corpus(
            args.output,
            args.distinct,
            args.tokens,
            args.files,
            args.exponent,
            args.seed,
            args.format,
            args.gzip,
            so,
            valid_files=args.valid_files,
            test_files=args.test_files,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {len(uris)} {args.format} files, {args.tokens:,} tokens over {args.distinct:,} distinct words "
        f"in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
