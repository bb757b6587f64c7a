"""The prepare stage on a real local Ray: PTB counts, exact streams, bad input, a killed run.

One Ray instance serves the whole module (starting Ray costs seconds on 2 cores).
"""

from __future__ import annotations

import gzip
import lzma
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from jobs import prepare as prepare_job
from lightrnn.corpus import count_words, encode_file
from lightrnn.vocab import Vocabulary, VocabularyError
from pipeline import storage
from pipeline.dataset import DatasetError, open_dataset
from pipeline.prepare import Reading, _read_unit, prepare
from pipeline.runconfig import DataConfig
from pipeline.sources import CorpusError, Unit, plan_file
from pipeline.synth import write_corpus

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def ray_local() -> Iterator[None]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ptb_prepared(ptb_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("ptb") / "prepared")
    config = DataConfig(
        train=str(ptb_dir / "ptb.train.txt.xz"),
        valid=str(ptb_dir / "ptb.valid.txt"),
        test=str(ptb_dir / "ptb.test.txt"),
        block_len=4096,
    )
    return out, prepare(config, out)


def test_ptb_counts_and_exact_streams(ptb_dir: Path, ptb_prepared: tuple[str, dict]) -> None:
    out, manifest = ptb_prepared
    assert manifest["splits"]["train"]["tokens"] == 929_589  # the published count, with <eos>
    assert manifest["vocab"]["size"] == 10_000
    data = open_dataset(out)
    vocab = data.vocab()
    assert len(vocab) == 10_000
    assert vocab == Vocabulary.build(count_words([ptb_dir / "ptb.train.txt.xz"]))  # ids as one process gives them
    files = {"train": "ptb.train.txt.xz", "valid": "ptb.valid.txt", "test": "ptb.test.txt"}
    for split, name in files.items():
        stream = data.tokens(split)
        assert stream.dtype == np.int32
        np.testing.assert_array_equal(stream, encode_file(ptb_dir / name, vocab))
        blocks = data.read_blocks(split).column("tokens").to_pylist()
        assert all(len(b) == 4096 for b in blocks[:-1]) and 0 < len(blocks[-1]) <= 4096


def test_ptb_rerun_is_a_noop_and_other_config_is_refused(ptb_dir: Path, ptb_prepared: tuple[str, dict]) -> None:
    out, manifest = ptb_prepared
    same = DataConfig(
        train=str(ptb_dir / "ptb.train.txt.xz"),
        valid=str(ptb_dir / "ptb.valid.txt"),
        test=str(ptb_dir / "ptb.test.txt"),
        block_len=4096,
    )
    again = prepare(same, out)
    assert again["skipped"] and again["run_id"] == manifest["run_id"]
    with pytest.raises(storage.DatasetExistsError, match="different configuration.*min_count"):
        prepare(DataConfig(train=same.train, block_len=4096, min_count=2), out)
    assert open_dataset(out).manifest["run_id"] == manifest["run_id"]  # untouched


def _write(path: Path, text: str) -> Path:
    data = text.encode()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    elif path.suffix == ".xz":
        data = lzma.compress(data)
    path.write_bytes(data)
    return path


def test_blocks_straddling_compressed_files_match_single_process(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = ["the", "The", "cat", "sat", "on", "a", "Mat", "rare", "é"]
    names = ["a.txt", "b.txt.gz", "c.txt.xz", "d.txt", "e.txt"]
    for name, n_lines in zip(names, [9, 1, 14, 0, 5], strict=True):  # d.txt is empty: contributes nothing
        lines = [" ".join(rng.choice(words, size=rng.integers(0, 6))) for _ in range(n_lines)]
        _write(corpus / name, "".join(line + "\n" for line in lines))
    out = str(tmp_path / "out")
    manifest = prepare(DataConfig(train=str(corpus), block_len=7, lower=True, min_count=2), out)
    data = open_dataset(out)
    vocab = data.vocab()
    assert "The" not in vocab and "the" in vocab  # lower-cased
    expected = np.concatenate([encode_file(corpus / n, vocab, lower=True) for n in names if n != "d.txt"])
    np.testing.assert_array_equal(data.tokens("train"), expected)
    assert manifest["splits"]["train"]["blocks"] == -(-expected.size // 7)
    assert any("edges" in s for s in manifest["splits"]["train"]["shards"])  # some blocks span files


def test_missing_input(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="not found: .*nope.txt"):
        prepare(DataConfig(train=str(tmp_path / "nope.txt")), str(tmp_path / "out"))
    assert not storage.exists(str(tmp_path / "out"))


def test_empty_corpus_leaves_no_dataset(tmp_path: Path) -> None:
    empty = _write(tmp_path / "empty.txt", "")
    out = str(tmp_path / "out")
    with pytest.raises(CorpusError, match="train corpus .*empty"):
        prepare(DataConfig(train=str(empty)), out)
    with pytest.raises(storage.DatasetNotCommittedError):
        open_dataset(out)


def test_invalid_utf8_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(gzip.compress(b"fine line\nstill fine\nbroken \xff\xfe here\n"))
    with pytest.raises(CorpusError, match=r"bad\.txt\.gz: line 3 is not valid UTF-8"):
        prepare(DataConfig(train=str(bad)), str(tmp_path / "out"))
    with pytest.raises(storage.DatasetNotCommittedError):
        open_dataset(str(tmp_path / "out"))


def test_output_holding_foreign_files_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.table({"x": [1, 2, 3]}), out / "part-0.parquet")
    corpus = _write(tmp_path / "c.txt", "a b c\n")
    with pytest.raises(storage.StorageError, match=r"not empty and holds no dataset manifest.*part-0\.parquet"):
        prepare(DataConfig(train=str(corpus)), str(out))
    assert (out / "part-0.parquet").exists()  # nothing of the user's was deleted
    with pytest.raises(storage.DatasetNotCommittedError, match="did not finish"):
        open_dataset(str(out))


def test_foreign_or_corrupt_files_in_a_committed_dataset(tmp_path: Path) -> None:
    corpus = _write(tmp_path / "c.txt", "a b c\nb c\n")
    out = tmp_path / "out"
    manifest = prepare(DataConfig(train=str(corpus), block_len=2), str(out))
    shard = out / manifest["splits"]["train"]["shards"][0]
    pq.write_table(pa.table({"x": [1, 2, 3]}), shard)  # someone else's Parquet in its place
    with pytest.raises(DatasetError, match="not a token-block shard"):
        open_dataset(str(out)).tokens("train")
    shard.write_bytes(b"PAR1 garbage")
    with pytest.raises(DatasetError, match="not readable Parquet"):
        open_dataset(str(out)).tokens("train")
    pq.write_table(pa.table({"x": [1]}), out / "vocab.parquet")
    with pytest.raises(VocabularyError, match="not a vocabulary"):
        open_dataset(str(out)).vocab()


# jobs.prepare, held just before its commit: the manifest write waits, so the test can kill it there
PAUSED_PREPARE = """
import sys, time
from pipeline import storage
from jobs import prepare

def paused(*args, **kwargs):
    print("pausing before the commit", flush=True)
    time.sleep(120)

storage.write_manifest = paused
sys.exit(prepare.main(sys.argv[1:]))
"""


def test_killed_run_is_never_read_and_rerun_completes(ptb_dir: Path, tmp_path: Path) -> None:
    """SIGKILL the job just before its commit; no reader accepts the output; a re-run finishes."""
    out = tmp_path / "out"
    argv = ["--train", str(ptb_dir / "ptb.valid.txt"), "--test", str(ptb_dir / "ptb.test.txt"), "--output", str(out)]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSED_PREPARE, *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        text=True,
    )
    watchdog = threading.Timer(180, os.killpg, (proc.pid, signal.SIGKILL))  # never hang the suite
    watchdog.start()
    try:
        for line in proc.stdout:  # wait until every shard is written and it waits to commit
            if "pausing" in line:
                break
        else:
            pytest.fail(f"jobs.prepare ended (rc {proc.wait()}) before reaching the commit")
        assert len(list((out / "shards").iterdir())) >= 2 and (out / "vocab.parquet").exists()
    finally:
        watchdog.cancel()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with pytest.raises(storage.DatasetNotCommittedError, match="did not finish"):
        open_dataset(str(out))

    t0 = time.perf_counter()
    assert prepare_job.main(argv) == 0  # same Ray, same arguments: starts over and commits
    assert time.perf_counter() - t0 < 60
    data = open_dataset(str(out))
    vocab = data.vocab()
    np.testing.assert_array_equal(data.tokens("train"), encode_file(ptb_dir / "ptb.valid.txt", vocab))
    np.testing.assert_array_equal(data.tokens("test"), encode_file(ptb_dir / "ptb.test.txt", vocab))
    shards = {p.name for p in (out / "shards").iterdir()}
    assert shards == {Path(s).name for split in data.splits for s in data.manifest["splits"][split]["shards"]}
    assert isinstance(vocab, Vocabulary) and data.manifest["splits"]["train"]["tokens"] == 73_760


def test_synthetic_zipf_corpus_has_exactly_the_asked_vocabulary(tmp_path: Path) -> None:
    uris = write_corpus(str(tmp_path / "zipf"), distinct=500, tokens=6000, files=3, compress=True)
    assert [Path(u).name for u in uris] == ["part-00000.txt.gz", "part-00001.txt.gz", "part-00002.txt.gz"]
    manifest = prepare(DataConfig(train=str(tmp_path / "zipf")), str(tmp_path / "out"))
    assert manifest["vocab"]["size"] == 500 + 2  # every word once at least, plus <unk> and <eos>
    lines = manifest["splits"]["train"]["lines"]
    assert manifest["splits"]["train"]["tokens"] == 6000 + lines
    counts = open_dataset(str(tmp_path / "out")).vocab().counts
    assert counts[0] > 10 * counts[100] > 0  # Zipf: the head word is far more frequent than rank 100


def test_cli_reports_bad_input_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert prepare_job.main(["--train", str(tmp_path / "none.txt"), "--output", str(tmp_path / "o")]) == 1
    assert "error: corpus input not found" in capsys.readouterr().err
    assert prepare_job.main(["--train", "x", "--output", str(tmp_path / "o"), "--block-len", "0"]) == 2
    assert "block_len must be >= 2" in capsys.readouterr().err


def test_wikitext2_counts_and_ids_as_one_process_gives_them(tmp_path: Path) -> None:
    train = REPO / "data" / "wikitext2" / "train.txt.xz"
    manifest = prepare(DataConfig(train=str(train), block_len=8192), str(tmp_path / "wt2"))
    assert manifest["splits"]["train"]["tokens"] == 2_088_628 and manifest["vocab"]["size"] == 33_278
    data = open_dataset(str(tmp_path / "wt2"))
    assert data.vocab() == Vocabulary.build(count_words([train]))  # non-ASCII text: the Arrow kernels
    np.testing.assert_array_equal(data.tokens("train"), encode_file(train, data.vocab()))


def _documents(rng: np.random.Generator, n: int) -> list[str]:
    words = ["the", "cat", "Sat", "on", "a", "mat", "é", "naïve", "x" * 12]
    return [
        "\n".join(" ".join(rng.choice(words, rng.integers(0, 7))) for _ in range(rng.integers(1, 5))) for _ in range(n)
    ]


def test_parquet_documents_give_the_same_dataset_as_the_same_text(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    (tmp_path / "pq").mkdir()
    (tmp_path / "txt").mkdir()
    for i in range(3):
        docs = _documents(rng, 40)
        pq.write_table(pa.table({"id": range(40), "body": docs}), tmp_path / "pq" / f"d{i}.parquet", row_group_size=7)
        # the same documents as text: each read as a file of its own, so a line end closes its last line
        (tmp_path / "txt" / f"d{i}.txt").write_text("".join(d if d.endswith("\n") else d + "\n" for d in docs if d))
    config = dict(block_len=9, max_vocab=8, lower=True)  # 9 distinct words: max_vocab trims
    from_parquet = prepare(DataConfig(train=str(tmp_path / "pq"), text_column="body", **config), str(tmp_path / "a"))
    prepare(DataConfig(train=str(tmp_path / "txt"), **config), str(tmp_path / "b"))
    a, b = open_dataset(str(tmp_path / "a")), open_dataset(str(tmp_path / "b"))
    assert a.vocab() == b.vocab() and len(a.vocab()) == 8
    np.testing.assert_array_equal(a.tokens("train"), b.tokens("train"))
    assert from_parquet["splits"]["train"]["units"] == 3  # a file's small row groups are read by one task


def test_a_large_text_file_is_split_into_tasks_that_give_the_same_dataset(ptb_dir: Path, tmp_path: Path) -> None:
    big = tmp_path / "ptb.train.txt"
    big.write_bytes(lzma.decompress((ptb_dir / "ptb.train.txt.xz").read_bytes()))  # 5.1 MB, one file
    split = prepare(DataConfig(train=str(big), block_len=1000, max_vocab=5000), str(tmp_path / "a"), unit_mb=1)
    whole = prepare(DataConfig(train=str(big), block_len=1000, max_vocab=5000), str(tmp_path / "b"), unit_mb=64)
    # one task reads the file in 1 MB chunks and merges their dictionaries
    chunked = prepare(DataConfig(train=str(big), block_len=1000, max_vocab=5000), str(tmp_path / "c"), chunk_mb=1)
    assert split["splits"]["train"]["units"] == 5 and whole["splits"]["train"]["units"] == 1
    assert chunked["splits"]["train"]["units"] == 1
    a, b, c = (open_dataset(str(tmp_path / x)) for x in "abc")
    assert a.vocab() == b.vocab() == c.vocab() == Vocabulary.build(count_words([big]), 5000)
    np.testing.assert_array_equal(a.tokens("train"), b.tokens("train"))
    np.testing.assert_array_equal(c.tokens("train"), b.tokens("train"))
    assert any("edges" in s for s in split["splits"]["train"]["shards"])  # blocks span the units


def test_a_large_parquet_file_is_split_by_row_groups_into_tasks(ptb_dir: Path, tmp_path: Path) -> None:
    lines = lzma.decompress((ptb_dir / "ptb.train.txt.xz").read_bytes()).decode().splitlines()
    docs = ["\n".join(lines[i : i + 10]) for i in range(0, len(lines), 10)]  # 4,207 documents of 10 lines
    pq.write_table(pa.table({"text": docs}), tmp_path / "ptb.parquet", row_group_size=400)  # 11 groups of ~0.5 MB
    config = DataConfig(train=str(tmp_path / "ptb.parquet"), block_len=1000, max_vocab=5000)
    split = prepare(config, str(tmp_path / "a"), unit_mb=1)  # two row groups a unit
    whole = prepare(config, str(tmp_path / "b"), unit_mb=64)
    assert split["splits"]["train"]["units"] == 6 and whole["splits"]["train"]["units"] == 1
    a, b = open_dataset(str(tmp_path / "a")), open_dataset(str(tmp_path / "b"))
    assert a.vocab() == b.vocab()
    np.testing.assert_array_equal(a.tokens("train"), b.tokens("train"))
    assert a.tokens("train").size == 929_589


def _unit_words(unit: Unit, chunk_bytes: int) -> tuple[int, list[str], int]:
    """(chunks, words, lines) of a unit read `chunk_bytes` at a time."""
    chunks, distinct, _ = _read_unit(unit, Reading(False, "text", chunk_bytes, {}))
    words = [w for codes, _ in chunks for w in distinct.take(pa.array(codes)).to_pylist()]
    return len(chunks), words, sum(offsets.size - 1 for _, offsets in chunks)


def test_a_unit_read_in_chunks_gives_the_words_of_one_read(ptb_dir: Path, tmp_path: Path) -> None:
    text = (ptb_dir / "ptb.valid.txt").read_text()
    lines = text.splitlines()
    (tmp_path / "v.txt").write_text(text)
    docs = ["\n".join(lines[i : i + 10]) for i in range(0, len(lines), 10)]
    pq.write_table(pa.table({"text": docs}), tmp_path / "v.pq")
    for name in ("v.txt", "v.pq"):
        [unit] = plan_file(str(tmp_path / name), "train", 0, 1 << 30, "text", None)
        pieces, words, line_count = _unit_words(unit, 1 << 14)  # 16 KB chunks, one dictionary for the unit
        assert pieces > 10 and _unit_words(unit, 1 << 30)[1:] == (words, line_count) == (text.split(), len(lines))


@pytest.mark.parametrize(("max_vocab", "min_count", "partitions"), [(300, 1, 3), (301, 2, 5), (0, 3, 2)])
def test_counts_cut_by_partition_give_the_single_process_vocabulary(
    tmp_path: Path, max_vocab: int, min_count: int, partitions: int
) -> None:
    write_corpus(str(tmp_path / "zipf"), distinct=2000, tokens=30_000, files=3)
    files = sorted((tmp_path / "zipf").iterdir())
    data = DataConfig(train=str(tmp_path / "zipf"), max_vocab=max_vocab, min_count=min_count, block_len=64)
    manifest = prepare(data, str(tmp_path / "out"), partitions=partitions)
    vocab = open_dataset(str(tmp_path / "out")).vocab()
    expected = Vocabulary.build(count_words(files), max_vocab, min_count)
    assert vocab == expected  # the same words, counts (<unk> included) and ids
    assert manifest["vocab"]["distinct_words"] == 2002 and manifest["partitions"] == partitions


def test_bad_parquet_input_is_named_and_nothing_is_committed(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    pq.write_table(pa.table({"body": ["a b"], "n": [1]}), tmp_path / "no-text.parquet")
    with pytest.raises(CorpusError, match=r"no-text\.parquet has no column 'text' \(it has body, n\)"):
        prepare(DataConfig(train=str(tmp_path / "no-text.parquet")), out)
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(CorpusError, match=r"ints\.parquet: column 'text' holds int64, not text"):
        prepare(DataConfig(train=str(tmp_path / "ints.parquet")), out)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(CorpusError, match=r"broken\.parquet is not a readable Parquet file"):
        prepare(DataConfig(train=str(tmp_path / "broken.parquet")), out)
    with pytest.raises(CorpusError, match=r"matches no files"):
        prepare(DataConfig(train=str(tmp_path / "*.nothing")), out)
    with pytest.raises(storage.DatasetNotCommittedError):
        open_dataset(out)


def test_null_documents_are_skipped_and_counted(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": ["a b", None, "c", None, None]}), tmp_path / "docs.parquet")
    manifest = prepare(DataConfig(train=str(tmp_path / "docs.parquet"), block_len=4), str(tmp_path / "out"))
    assert manifest["splits"]["train"]["null_documents"] == 3
    data = open_dataset(str(tmp_path / "out"))
    assert data.vocab().decode(data.tokens("train")) == ["a", "b", "<eos>", "c", "<eos>"]
