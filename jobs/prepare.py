"""Prepare a corpus: text or Parquet documents on storage -> vocabulary + Parquet token blocks + manifest.

    python -m jobs.prepare --train data/ptb/ptb.train.txt.xz --valid data/ptb/ptb.valid.txt \
        --test data/ptb/ptb.test.txt --output /tmp/ptb-prepared
    python -m jobs.prepare --train 's3://corpus/docs/*.parquet' --text-column text \
        --output s3://runs/cw/prepared --s3-endpoint http://127.0.0.1:5555 --max-vocab 10000000

Starts a local Ray unless RAY_ADDRESS names a cluster (then `ray job submit -- python -m
jobs.prepare ...` works too). Re-running with the same arguments is a no-op once done.
"""

from __future__ import annotations

import argparse
import json
import sys

from lightrnn.vocab import VocabularyError
from pipeline.cluster import connect_ray
from pipeline.prepare import UNIT_MB, prepare, summary
from pipeline.runconfig import DataConfig
from pipeline.sources import CorpusError
from pipeline.storage import StorageError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.prepare", description=__doc__.splitlines()[0])
    p.add_argument("--train", required=True, help="train text or Parquet documents: file, folder or glob URI")
    p.add_argument("--valid", help="validation text URI (encoded with the train vocabulary)")
    p.add_argument("--test", help="test text URI (encoded with the train vocabulary)")
    p.add_argument("--output", required=True, help="dataset root URI (local path, file://, s3://)")
    p.add_argument("--max-vocab", type=int, default=0, help="keep at most N words incl. <unk>, <eos> (0: no limit)")
    p.add_argument("--min-count", type=int, default=1, help="drop words seen fewer times (to <unk>)")
    p.add_argument("--block-len", type=int, default=DataConfig.block_len, help="tokens per Parquet block")
    p.add_argument("--lower", action="store_true", help="lower-case before counting and encoding")
    p.add_argument("--text-column", default=DataConfig.text_column, help="Parquet input: the column of document texts")
    p.add_argument("--unit-mb", type=int, default=UNIT_MB, help="MB of text per task")
    p.add_argument("--partitions", type=int, default=0, help="word-count partitions (0: one per 64 MB of train text)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL or AWS)")
    p.add_argument("--json", action="store_true", help="end with one JSON line: the manifest")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    storage_options = {"endpoint_url": args.s3_endpoint} if args.s3_endpoint else {}
    try:
        config = DataConfig(
            train=args.train,
            valid=args.valid or "",
            test=args.test or "",
            max_vocab=args.max_vocab,
            min_count=args.min_count,
            block_len=args.block_len,
            lower=args.lower,
            text_column=args.text_column,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    connect_ray(args.num_cpus)
    try:
        manifest = prepare(config, args.output, storage_options, unit_mb=args.unit_mb, partitions=args.partitions)
    except (CorpusError, StorageError, VocabularyError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary(manifest) + (" (already done)" if manifest["skipped"] else ""), flush=True)
    if args.json:
        print(json.dumps(manifest, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
