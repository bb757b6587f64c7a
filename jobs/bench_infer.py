"""Next-word top-k latency and throughput of LightRNN vs the full softmax, and export sizes.

Each query reads one word (the state carried from the words before) and returns the
exact top-k next words. `lightrnn` is the row-by-row search of `lightrnn.infer`;
`lightrnn-all` builds all V probabilities first (`next_word_log_probs` + topk), as the
full softmax must. Models are randomly initialised unless --model names a trained
export, which is then timed on real text. Latency: one context per query, median over
--queries; throughput: --batch contexts per call. Models take turns, so drift on a noisy
machine hits them alike.

Export sizes are those of the files `lightrnn.export.save_model` writes (fp32 and int8),
for a synthetic vocabulary of V words; a full softmax too large to build
(> --max-build-bytes) is sized from its state dict on the meta device, plus the same
vocabulary file.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lightrnn.allocation import Allocation, table_shape
from lightrnn.config import ModelConfig
from lightrnn.corpus import encode_file
from lightrnn.export import export_bytes, export_state, save_model
from lightrnn.infer import topk_next_words
from lightrnn.model import LanguageModel, State, build_model
from lightrnn.train import inference
from lightrnn.vocab import EOS, UNK, Vocabulary
from pipeline.models import load_model_uri

METHODS = ("lightrnn", "lightrnn-all", "full")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vocab", default="100000,1000000", help="comma list of vocabulary sizes V")
    parser.add_argument("--hidden", type=int, default=256, help="LSTM width H (and embedding width)")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--k", type=int, default=10, help="the k of top-k")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--queries", type=int, default=20, help="timed single-context queries per method")
    parser.add_argument("--batch", type=int, default=32, help="contexts per call for throughput")
    parser.add_argument("--batches", type=int, default=3, help="timed batched calls per method")
    parser.add_argument("--sizes-only", action="store_true", help="only export sizes (e.g. at V = 10M)")
    parser.add_argument("--no-sizes", action="store_true", help="skip writing exports")
    parser.add_argument("--max-build-bytes", type=float, default=4e9, help="size larger full softmaxes on meta")
    parser.add_argument("--model", help="a trained export (any URI) to time on --text instead of random models")
    parser.add_argument("--text", default="data/ptb/ptb.test.txt", help="text read by --model")
    parser.add_argument("--seed", type=int, default=0)


def _query(method: str, model: LanguageModel, tokens_BT: torch.Tensor, k: int, state: State | None):
    if method == "lightrnn-all":
        logp_BV, state = model.next_word_log_probs(tokens_BT, state)
        return logp_BV.topk(k, dim=-1).indices, state, None
    top = topk_next_words(model, tokens_BT, k, state)
    return top.word_ids, top.state, top.rows_visited if method == "lightrnn" else None


def _time_methods(
    models: dict[str, LanguageModel], stream_N: torch.Tensor, args: argparse.Namespace, vocab_size: int
) -> dict[str, dict]:
    """Latency (batch 1, state carried along `stream_N`) and batched throughput of every method."""
    out: dict[str, dict] = {m: {"latency_ms": [], "rows_visited": [], "batch_s": 0.0} for m in models}
    states: dict[str, State | None] = dict.fromkeys(models)
    answers: dict[str, list] = {m: [] for m in models}
    g = torch.Generator().manual_seed(args.seed + 1)
    batch_BT = torch.randint(0, vocab_size, (args.batch, 5), generator=g)
    with torch.no_grad():
        for method, model in models.items():  # warm-up, and a context to start from
            _, states[method], _ = _query(method, model, stream_N[:5].view(1, -1), args.k, None)
            _query(method, model, batch_BT, args.k, None)
        for i in range(args.queries):  # models take turns query by query
            word_11 = stream_N[5 + i].view(1, 1)
            for method, model in models.items():
                start = time.perf_counter()
                ids, states[method], rows = _query(method, model, word_11, args.k, states[method])
                out[method]["latency_ms"].append(1e3 * (time.perf_counter() - start))
                answers[method].append(ids[0].tolist())
                if rows is not None:
                    out[method]["rows_visited"].append(int(rows[0]))
        for _ in range(args.batches):
            for method, model in models.items():
                start = time.perf_counter()
                _query(method, model, batch_BT, args.k, None)
                out[method]["batch_s"] += time.perf_counter() - start
            gc.collect()
    if "lightrnn" in answers and "lightrnn-all" in answers:
        # the search is exact: same words as the brute force (order may differ only on exact ties)
        same = sum(sorted(a) == sorted(b) for a, b in zip(answers["lightrnn"], answers["lightrnn-all"], strict=True))
        out["lightrnn"]["same_as_all"] = f"{same}/{len(answers['lightrnn'])}"
    for stats in out.values():
        stats["latency_ms_median"] = statistics.median(stats["latency_ms"])
        stats["queries_per_s"] = args.batch * args.batches / stats["batch_s"]
    return out


def _synthetic_vocab(vocab_size: int) -> Vocabulary:
    words = [UNK, EOS, *(f"w{i}" for i in range(vocab_size - 2))]
    return Vocabulary(words, np.arange(vocab_size, 0, -1))


def _export_sizes(config: ModelConfig, model: LanguageModel | None, vocab: Vocabulary) -> dict:
    """Bytes of the fp32 and int8 exports; `computed` when the model is too large to build."""
    sizes: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-infer-") as tmp:
        if model is None:
            with torch.device("meta"):
                meta = build_model(config)
            vocab.save(Path(tmp) / "vocab.parquet")
            vocab_bytes = (Path(tmp) / "vocab.parquet").stat().st_size
            for q in (None, "int8"):
                state, _ = export_state(meta, q)
                tensor_bytes = sum(t.numel() * t.element_size() for t in state.values())
                sizes["int8" if q else "fp32"] = {"model.pt": tensor_bytes, "vocab.parquet": vocab_bytes}
                sizes["int8" if q else "fp32"]["total"] = tensor_bytes + vocab_bytes
            sizes["computed"] = True
            return sizes
        for q in (None, "int8"):
            out = save_model(Path(tmp) / (q or "fp32"), model, vocab, quantize=q)
            sizes["int8" if q else "fp32"] = export_bytes(out)
            for path in out.iterdir():
                path.unlink()
        sizes["computed"] = False
    return sizes


def _print_sizes(vocab_size: int, sizes: dict[str, dict]) -> None:
    mb = 1e6
    print(f"export sizes at V={vocab_size:,} (all files; model.pt in brackets)")
    for kind, s in sizes.items():
        note = " (computed from the state dict: too large to build here)" if s.get("computed") else ""
        print(
            f"  {kind:<10} fp32 {s['fp32']['total'] / mb:>10,.1f} MB [{s['fp32']['model.pt'] / mb:,.1f}]"
            f"   int8 {s['int8']['total'] / mb:>10,.1f} MB [{s['int8']['model.pt'] / mb:,.1f}]{note}"
        )


def _print_times(title: str, times: dict[str, dict], k: int, batch: int) -> None:
    print(title)
    print(
        f"  {'method':<14}{'top-' + str(k) + ' latency':>16}{'throughput (batch ' + str(batch) + ')':>24}{'rows':>14}"
    )
    for method, s in times.items():
        rows = s["rows_visited"]
        rows_text = f"{statistics.mean(rows):.0f} (max {max(rows)})" if rows else "-"
        print(f"  {method:<14}{s['latency_ms_median']:>13.2f} ms{s['queries_per_s']:>17,.0f} q/s{rows_text:>21}")
    if "same_as_all" in times.get("lightrnn", {}):
        print(
            f"  lightrnn search returned the same top-{k} as lightrnn-all on {times['lightrnn']['same_as_all']} queries"
        )


def _summary(times: dict[str, dict]) -> dict:
    return {
        m: {
            "latency_ms_median": round(s["latency_ms_median"], 3),
            "queries_per_s": round(s["queries_per_s"], 1),
            **({"rows_visited_mean": round(statistics.mean(s["rows_visited"]), 1)} if s["rows_visited"] else {}),
            **({"rows_visited_max": max(s["rows_visited"])} if s["rows_visited"] else {}),
            **({"same_as_all": s["same_as_all"]} if "same_as_all" in s else {}),
        }
        for m, s in times.items()
    }


def _run_trained(args: argparse.Namespace) -> dict:
    model, vocab = load_model_uri(args.model)
    stream = torch.from_numpy(encode_file(args.text, vocab)[: args.queries + 10].astype(np.int64))
    methods = ["lightrnn", "lightrnn-all"] if model.config.kind == "lightrnn" else ["full"]
    with inference(model):
        times = _time_methods({m: model for m in methods}, stream, args, len(vocab))
    _print_times(
        f"trained {model.config.kind} from {args.model}, V={len(vocab):,}, on {args.text}", times, args.k, args.batch
    )
    return {"model": args.model, "vocab": len(vocab), "k": args.k, "times": _summary(times)}


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(torch.get_num_threads())  # OMP_NUM_THREADS decides; reported below
    if args.model:
        return _run_trained(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    vocab_sizes = [int(v) for v in args.vocab.split(",")]
    result: dict = {"hidden": args.hidden, "layers": args.layers, "k": args.k, "threads": torch.get_num_threads()}
    for vocab_size in vocab_sizes:
        rows, cols = table_shape(vocab_size)
        entry: dict = {"table": [rows, cols]}
        models: dict[str, LanguageModel] = {}
        configs = {
            kind: ModelConfig(vocab_size, kind, args.hidden, args.hidden, args.layers, dropout=0.0)
            for kind in ("lightrnn", "full")
        }
        torch.manual_seed(args.seed)
        light = build_model(configs["lightrnn"], Allocation.random(vocab_size, seed=args.seed)).eval()
        full_bytes = (2 * vocab_size * args.hidden + vocab_size) * 4  # embeddings, head and bias, fp32
        wanted = ("full" in methods and not args.sizes_only) or (
            not args.no_sizes and full_bytes <= args.max_build_bytes
        )
        full = build_model(configs["full"]).eval() if wanted else None
        print(
            f"[V={vocab_size:,}] built: LightRNN {rows} x {cols} table" + (", full softmax" if full else ""), flush=True
        )
        if not args.sizes_only:
            for m in methods:
                models[m] = full if m == "full" else light
            g = torch.Generator().manual_seed(args.seed)
            stream = torch.randint(0, vocab_size, (args.queries + 10,), generator=g)
            times = _time_methods(models, stream, args, vocab_size)
            _print_times(
                f"V={vocab_size:,} H={args.hidden} L={args.layers}, {torch.get_num_threads()} thread(s), random init",
                times,
                args.k,
                args.batch,
            )
            entry["times"] = _summary(times)
        if not args.no_sizes:
            vocab = _synthetic_vocab(vocab_size)
            entry["export_bytes"] = {
                "lightrnn": _export_sizes(configs["lightrnn"], light, vocab),
                "full": _export_sizes(configs["full"], full, vocab),
            }
            _print_sizes(vocab_size, entry["export_bytes"])
        result[str(vocab_size)] = entry
        del light, full, models
        gc.collect()
    return result
