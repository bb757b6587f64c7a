from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from model_kinds import KINDS, kind_options

from lightrnn.allocation import Allocation
from lightrnn.config import ModelConfig
from lightrnn.corpus import count_words, encode_file
from lightrnn.export import (
    ExportError,
    dequantize_int8,
    export_bytes,
    load_model,
    quantize_int8,
    save_model,
)
from lightrnn.infer import sentence_log_probs
from lightrnn.model import build_model
from lightrnn.train import evaluate
from lightrnn.vocab import Vocabulary
from pipeline.models import load_model_uri


@pytest.fixture(scope="module")
def ptb_small(ptb_dir) -> tuple[Vocabulary, np.ndarray]:
    vocab = Vocabulary.build(count_words([ptb_dir / "ptb.valid.txt"]), max_size=300)  # 18 x 17: empty cells
    return vocab, encode_file(ptb_dir / "ptb.valid.txt", vocab)


def make(vocab: Vocabulary, kind: str = "lightrnn", seed: int = 0):
    torch.manual_seed(seed)
    kind, options = kind_options(kind)
    allocation = Allocation.random(len(vocab), seed=seed + 1) if kind == "lightrnn" else None
    return build_model(ModelConfig(len(vocab), kind, 16, 24, 2, **options), allocation).eval()


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_gives_identical_log_probs(tmp_path, ptb_small, kind: str) -> None:
    vocab, stream = ptb_small
    model = make(vocab, kind)
    save_model(tmp_path / "m", model, vocab)
    loaded, loaded_vocab = load_model(tmp_path / "m")
    assert loaded_vocab == vocab and not loaded.training
    tokens = torch.as_tensor(stream[:60]).view(3, 20)
    assert torch.equal(model.next_word_log_probs(tokens)[0], loaded.next_word_log_probs(tokens)[0])
    assert torch.equal(
        model.target_log_probs(tokens[:, :-1], tokens[:, 1:])[0],
        loaded.target_log_probs(tokens[:, :-1], tokens[:, 1:])[0],
    )
    if kind.startswith("lightrnn"):
        assert loaded.allocation() == model.allocation()
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["weights"] == "fp32" and manifest["quantized"] == []
    assert set(manifest["files"]) == {"model.pt", "config.json", "vocab.parquet"} | (
        {"allocation.parquet"} if kind.startswith("lightrnn") else set()
    )


def test_the_word_table_is_stored_once(tmp_path, ptb_small) -> None:
    vocab, _ = ptb_small
    save_model(tmp_path / "m", make(vocab), vocab)
    state = torch.load(tmp_path / "m" / "model.pt", weights_only=True)
    assert not {"row_of", "col_of", "occupied_RC"} & set(state)  # they come from allocation.parquet


def test_int8_rows_are_within_half_a_step() -> None:
    w = torch.randn(50, 30) * torch.logspace(-3, 1, 50)[:, None]
    w[7] = 0.0
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (50,)
    err = (dequantize_int8(q, scale) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()
    assert torch.equal(dequantize_int8(q, scale)[7], torch.zeros(30))


def test_int8_export_is_smaller_and_close(tmp_path, ptb_small) -> None:
    vocab, _ = ptb_small
    torch.manual_seed(0)
    model = build_model(ModelConfig(len(vocab), "full", 64, 64, 1)).eval()  # matrices large enough to dominate
    save_model(tmp_path / "fp32", model, vocab)
    save_model(tmp_path / "int8", model, vocab, quantize="int8")
    fp32, int8 = export_bytes(tmp_path / "fp32"), export_bytes(tmp_path / "int8")
    assert int8["model.pt"] < 0.3 * fp32["model.pt"]
    manifest = json.loads((tmp_path / "int8" / "manifest.json").read_text())
    assert manifest["weights"] == "int8" and "head.weight" in manifest["quantized"]
    loaded, _ = load_model(tmp_path / "int8")
    assert loaded.head.weight.dtype == torch.float32
    sentences = ["the company said it would", "shares rose"]
    a, _ = sentence_log_probs(model, vocab, sentences)
    b, _ = sentence_log_probs(loaded, vocab, sentences)
    assert not np.array_equal(a, b) and np.allclose(a, b, rtol=0.02)


def test_a_corrupt_file_is_named(tmp_path, ptb_small) -> None:
    vocab, _ = ptb_small
    out = save_model(tmp_path / "m", make(vocab), vocab)
    data = bytearray((out / "model.pt").read_bytes())
    data[-40] ^= 0xFF
    (out / "model.pt").write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"model.pt is corrupt: sha256"):
        load_model(out)


def _swap(tmp_path, name: str, other) -> None:
    """Replace one file of export `a` with export `other`'s, keeping the manifest consistent."""
    shutil.copy(other / name, tmp_path / "a" / name)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    manifest["files"][name] = json.loads((other / "manifest.json").read_text())["files"][name]
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(manifest))


def test_mismatched_pieces_are_refused_with_the_file_at_fault(tmp_path, ptb_small, ptb_dir) -> None:
    vocab, _ = ptb_small
    small_vocab = Vocabulary.build(count_words([ptb_dir / "ptb.valid.txt"]), max_size=200)
    other = save_model(tmp_path / "b", make(small_vocab), small_vocab)
    wider = save_model(
        tmp_path / "c", build_model(ModelConfig(len(vocab), "lightrnn", 16, 32, 2)), vocab
    )  # same vocabulary and table, other hidden width

    save_model(tmp_path / "a", make(vocab), vocab)
    _swap(tmp_path, "vocab.parquet", other)
    with pytest.raises(ExportError, match=r"vocab.parquet holds 200 words but config.json has vocab_size 300"):
        load_model(tmp_path / "a")

    save_model(tmp_path / "a", make(vocab), vocab)
    _swap(tmp_path, "allocation.parquet", other)
    with pytest.raises(ExportError, match=r"allocation.parquet places 200 words but the vocabulary has 300"):
        load_model(tmp_path / "a")

    save_model(tmp_path / "a", make(vocab), vocab)
    _swap(tmp_path, "model.pt", wider)
    with pytest.raises(ExportError, match=r"model.pt does not fit config.json: .*row_head.weight \(18, 32\)"):
        load_model(tmp_path / "a")

    (tmp_path / "a" / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        load_model(tmp_path / "a")
    with pytest.raises(ExportError, match="the vocabulary has 200 words"):
        save_model(tmp_path / "d", make(vocab), small_vocab)


def test_load_from_an_fsspec_uri(tmp_path, ptb_small) -> None:
    import fsspec

    vocab, stream = ptb_small
    model = make(vocab)
    local = save_model(tmp_path / "m", model, vocab)
    fs = fsspec.filesystem("memory")
    for path in local.iterdir():
        fs.pipe(f"/exports/m/{path.name}", path.read_bytes())
    loaded, _ = load_model_uri("memory://exports/m")
    tokens = torch.as_tensor(stream[:20]).view(2, 10)
    assert torch.equal(model.next_word_log_probs(tokens)[0], loaded.next_word_log_probs(tokens)[0])


def test_pyfunc_model_scores_through_mlflow(tmp_path, ptb_small, monkeypatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    from pipeline.mlflow_model import log_pyfunc_model

    vocab, _ = ptb_small
    model = make(vocab)
    export = save_model(tmp_path / "export", model, vocab)
    monkeypatch.chdir(tmp_path)  # artifacts land under ./mlruns with a sqlite store and no server
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        with mlflow.start_run():
            uri = log_pyfunc_model(export)
            run_id = mlflow.active_run().info.run_id
        pyfunc = mlflow.pyfunc.load_model(uri)
        sentences = ["the company said", "shares rose sharply", ""]
        out = pyfunc.predict(pd.DataFrame({"text": sentences}))
        expected, tokens = sentence_log_probs(model, vocab, sentences)
        assert list(out.columns) == ["log_prob", "tokens", "ppl"]
        assert np.allclose(out["log_prob"].to_numpy(), expected, atol=1e-6)
        assert out["tokens"].tolist() == tokens.tolist()
        assert np.allclose(out["ppl"].to_numpy(), np.exp(-expected / tokens))
        # the same logged model opens as a plain export through its MLflow URI
        loaded, _ = load_model_uri(uri)
        assert torch.equal(loaded.row_head.weight, model.row_head.weight)
        assert mlflow.get_run(run_id).info.status == "FINISHED"
    finally:
        mlflow.set_tracking_uri(None)


def test_score_and_generate_commands(tmp_path, ptb_small, ptb_dir, capsys) -> None:
    from jobs import generate, score

    vocab, _ = ptb_small
    model = make(vocab)
    save_model(tmp_path / "m", model, vocab)
    text = tmp_path / "text.txt"
    text.write_text("\n".join((ptb_dir / "ptb.test.txt").read_text().splitlines()[:50]) + "\n")
    assert score.main(["--model", str(tmp_path / "m"), "--input", str(text), "--per-line", "-", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    stream = encode_file(text, vocab)
    assert result["tokens"] == stream.shape[0] and result["lines"] == 50
    assert result["ppl"] == pytest.approx(evaluate(model, stream, vocab.eos_id).ppl, rel=1e-6)
    per_line = [float(line.split("\t")[0]) for line in lines[:50]]
    assert sum(per_line) == pytest.approx(result["log_prob"], abs=0.01)

    argv = ["--model", str(tmp_path / "m"), "--prompt", "the company", "--next", "5", "--json"]
    assert generate.main(argv) == 0
    top = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["next"]
    assert len(top) == 5 and top[0]["log_prob"] >= top[-1]["log_prob"]
    assert generate.main(["--model", str(tmp_path / "m"), "--prompt", "the", "--top-k", "5", "--words", "4"]) == 0
    assert score.main(["--model", str(tmp_path / "nothing"), "--input", str(text)]) == 1
    assert "holds no saved model" in capsys.readouterr().err


@pytest.mark.parametrize(("kind", "ppl"), [("lightrnn", 32.34195651068286), ("full", 30.26495501557823)])
def test_an_export_written_by_an_earlier_version_still_loads(kind: str, ppl: float) -> None:
    """tests/data/export-v1 was written before the word table left the model's state dict."""
    model, vocab = load_model(Path(__file__).parent / "data" / "export-v1" / kind)
    stream = np.random.default_rng(0).integers(0, 30, 200)
    assert len(vocab) == 30 and model.config.kind == kind
    assert evaluate(model, stream, vocab.eos_id, 4, 7).ppl == pytest.approx(ppl, rel=1e-6)  # float32 sums
