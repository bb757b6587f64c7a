"""The whole pipeline: corpus -> phases of training with reallocations -> evaluation -> export.

    data -> train-0 -> costs-0 -> realloc-0 -> train-1 -> ... -> train-R -> evaluate -> export

Everything lands under one run root (a local path or s3://):

    ROOT/pipeline.json                  the config of record and the MLflow parent run id
    ROOT/data/                          the prepared dataset (pipeline.prepare; manifest.json commits it)
    ROOT/allocation/phase-K.parquet     the word table phase K trains with
    ROOT/train/phase-K/checkpoint_*     Ray Train checkpoints of phase K (resumable)
    ROOT/costs-K/head_inputs.npz        per-word head-input sums after phase K
    ROOT/export/                        the final model (lightrnn.export)
    ROOT/stages/NAME.json               written last by each stage: its commit

A stage whose commit file exists is skipped on a re-run; a stage that was interrupted
runs again (a training phase continues from its latest checkpoint). The learning-rate
schedule and the data position run across phases, as in `lightrnn.phases`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import posixpath
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow

from lightrnn.allocation import Allocation
from lightrnn.export import save_model
from lightrnn.mlflow_model import log_pyfunc_model
from lightrnn.phases import initial_allocation, phase_bounds
from pipeline import storage, tasks
from pipeline.dataset import TokenDataset, open_dataset
from pipeline.prepare import PrepareConfig, prepare
from pipeline.runconfig import RunConfig
from pipeline.tracking import Tracker, default_tracking_uri, plot_allocation, plot_learning_curves, temp_dir, ui_command
from pipeline.train import DistConfig, run_training
from pipeline.train_loop import load_checkpoint_state, make_schedule

PIPELINE_FILE = "pipeline.json"
STAGES_DIR = "stages"


class PipelineError(storage.StorageError):
    """The run root cannot be used as asked (another config's run, a damaged stage)."""


@dataclass(frozen=True)
class PipelineOptions:
    """How and where to run; unlike RunConfig, none of this changes the trained model."""

    root: str
    workers: int = 2
    use_gpu: bool = False
    tracking_uri: str = ""  # "" = sqlite next to a local root (see pipeline.tracking)
    experiment: str = "lightrnn"
    checkpoint_every: int = 200
    max_failures: int = 1
    cost_tasks: int = 0  # Ray tasks in the cost pass; 0 = one per worker

    def __post_init__(self) -> None:
        if self.workers < 1 or self.cost_tasks < 0:
            raise ValueError(f"workers must be >= 1 and cost_tasks >= 0, got {self.workers}, {self.cost_tasks}")


def stage_names(config: RunConfig) -> list[str]:
    rounds = config.realloc.rounds if config.model.kind == "lightrnn" else 0
    names = ["data"]
    for k in range(rounds + 1):
        names.append(f"train-{k}")
        if k < rounds:
            names += [f"costs-{k}", f"realloc-{k}"]
    return [*names, "evaluate", "export"]


def _log(message: str) -> None:
    print(message, flush=True)


class Pipeline:
    def __init__(self, config: RunConfig, options: PipelineOptions) -> None:
        root = options.root.rstrip("/")
        self.root = os.path.abspath(root) if "://" not in root else root
        self.options = options
        self.tracking_uri = options.tracking_uri or default_tracking_uri(self.root)
        self.rounds = config.realloc.rounds if config.model.kind == "lightrnn" else 0
        self.config = dataclasses.replace(config, realloc=dataclasses.replace(config.realloc, rounds=self.rounds))
        self.records: dict[str, dict[str, Any]] = {}
        self.tracker: Tracker | None = None

    # -- layout ------------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    @property
    def data_root(self) -> str:
        return self.path("data")

    def allocation_uri(self, phase: int) -> str:
        return self.path("allocation", f"phase-{phase}.parquet")

    def committed(self, stage: str) -> dict[str, Any] | None:
        uri = self.path(STAGES_DIR, f"{stage}.json")
        if not storage.exists(uri):
            return None
        with storage.open(uri, "rb") as f:
            return json.loads(f.read())

    def _commit(self, stage: str, record: dict[str, Any]) -> None:
        storage.write_bytes(self.path(STAGES_DIR, f"{stage}.json"), json.dumps(record, indent=2).encode())

    # -- the run -----------------------------------------------------------------------

    def _check_root(self) -> dict[str, Any]:
        """The root's pipeline.json; refuses a root that holds a run of another config."""
        # the schedule (steps per epoch, phase bounds) depends on the worker count too
        recorded = {**self.config.flat(), "workers": self.options.workers}
        uri = self.path(PIPELINE_FILE)
        if storage.exists(uri):
            with storage.open(uri, "rb") as f:
                existing = json.loads(f.read())
            old = existing.get("config", {})
            # keys the root never recorded (a run from before they existed) are not a difference
            differ = sorted(k for k in old if old[k] != _jsonable(recorded.get(k)))
            if differ:
                changes = ", ".join(f"{k}: {old.get(k)!r} -> {recorded.get(k)!r}" for k in differ[:6])
                raise PipelineError(
                    f"{self.root} holds a pipeline run with other settings ({changes}); "
                    "choose another --root, or delete it to start over"
                )
            return existing
        return {"config": _jsonable(recorded), "mlflow": {}}

    def run(self) -> dict[str, Any]:
        state = self._check_root()
        tracker = self.tracker = Tracker(self.tracking_uri, self.options.experiment)
        parent = tracker.start_parent(
            state["mlflow"].get("run_id", "") if state["mlflow"].get("tracking_uri") == self.tracking_uri else "",
            run_name=f"{self.config.name}-{posixpath.basename(self.root)}",
            params={**self.config.flat(), "root": self.root, "workers": self.options.workers},
            tags={"lightrnn.root": self.root, "lightrnn.config": self.config.name},
        )
        state["mlflow"] = {"tracking_uri": self.tracking_uri, "experiment_id": tracker.experiment_id, "run_id": parent}
        storage.write_bytes(self.path(PIPELINE_FILE), json.dumps(state, indent=2).encode())
        _log(f"[pipeline] {self.config.name} -> {self.root}; MLflow run {parent} at {self.tracking_uri}")
        try:
            for stage in stage_names(self.config):
                record = self.committed(stage)
                if record is not None:
                    _log(f"[skip] {stage}: committed {record['finished']}")
                    self.records[stage] = record
                    continue
                kind, _, index = stage.partition("-")
                _log(f"[stage] {stage}")
                started = time.perf_counter()
                with tracker.stage(stage) as run_id:
                    outputs, metrics = getattr(self, f"_stage_{kind}")(int(index) if index else 0, run_id)
                    # a training phase's figures belong at its last step, beside rank 0's per-step ones
                    step = int(metrics.get("steps", 0))
                    tracker.log_metrics(run_id, {**metrics, "stage_seconds": time.perf_counter() - started}, step)
                record = {
                    "stage": stage,
                    "outputs": outputs,
                    "metrics": metrics,
                    "seconds": round(time.perf_counter() - started, 3),
                    "mlflow_run_id": run_id,
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                }
                self._commit(stage, record)
                self.records[stage] = record
                self._log_parent(stage, metrics)
        except BaseException:
            tracker.finish("FAILED")
            raise
        tracker.finish()
        return self.summary()

    def summary(self) -> dict[str, Any]:
        evaluation = self.records["evaluate"]["metrics"]
        phases = [self.records[f"train-{k}"]["metrics"] for k in range(self.rounds + 1)]
        return {
            "config": self.config.name,
            "model": self.config.model.kind,
            "root": self.root,
            "test_ppl": evaluation.get("test_ppl"),
            "valid_ppl": evaluation.get("valid_ppl"),
            "valid_ppl_per_phase": [p.get("valid_ppl") for p in phases],
            "words_moved": [self.records[f"realloc-{k}"]["metrics"].get("words_moved") for k in range(self.rounds)],
            "words_per_s": [p.get("words_per_s") for p in phases],
            "export": self.records["export"]["outputs"]["model"],
            "export_int8": self.records["export"]["outputs"]["model_int8"],
            "mlflow_model": self.records["export"]["outputs"]["mlflow_model"],
            "tracking_uri": self.tracking_uri,
            "mlflow_run_id": self.tracker.parent_id if self.tracker else None,
            "mlflow_ui": ui_command(self.tracking_uri),
        }

    def _log_parent(self, stage: str, metrics: dict[str, float]) -> None:
        assert self.tracker is not None
        kind, _, index = stage.partition("-")
        step = int(index) if index else 0
        keep = {
            "data": ("vocab_size", "train_tokens"),
            "train": ("valid_ppl", "words_per_s", "train_loss"),
            "realloc": ("cost_before", "cost_after", "words_moved", "seconds"),
            "evaluate": ("test_ppl", "valid_ppl"),
            "export": ("export_mb", "export_int8_mb"),
        }.get(kind, ())
        prefix = {"train": "phase_", "realloc": "realloc_", "evaluate": "final_"}.get(kind, "")
        names = {"realloc_seconds": "realloc_solve_seconds"}
        chosen = {names.get(prefix + k, prefix + k): metrics[k] for k in keep if k in metrics}
        self.tracker.log_metrics(self.tracker.parent_id, chosen, step=step)

    # -- stages --------------------------------------------------------------------------

    def _stage_data(self, _: int, run_id: str) -> tuple[dict[str, str], dict[str, float]]:
        d = self.config.data
        manifest = prepare(
            PrepareConfig(
                train=d.train,
                valid=d.valid or None,
                test=d.test or None,
                output=self.data_root,
                max_vocab=d.max_vocab,
                min_count=d.min_count,
                block_len=d.block_len,
                lower=d.lower,
            )
        )
        vocab = open_dataset(self.data_root).vocab()
        metrics = {f"{s}_tokens": float(info["tokens"]) for s, info in manifest["splits"].items()}
        metrics["vocab_size"] = float(len(vocab))
        summary = {
            "vocab_size": len(vocab),
            "tokens": {s: info["tokens"] for s, info in manifest["splits"].items()},
            "top_words": [[w, int(c)] for w, c in zip(vocab.words[:50], vocab.counts[:50], strict=True)],
            "words_seen_once": int((vocab.counts == 1).sum()),
        }
        assert self.tracker is not None
        self.tracker.client.log_dict(run_id, summary, "vocab_summary.json")
        self.tracker.client.log_dict(self.tracker.parent_id, summary, "vocab_summary.json")
        self.tracker.client.log_dict(self.tracker.parent_id, self.config.as_dict(), "config.json")
        return {"dataset": self.data_root}, metrics

    def _schedule(self, dataset: TokenDataset) -> tuple[list[int], int]:
        train_blocks = dataset.manifest["splits"]["train"]["tokens"] // dataset.block_len
        total = make_schedule(train_blocks, dataset.block_len, self.options.workers, self.config.train).total_steps
        if self.rounds >= total:
            raise ValueError(f"{self.rounds} reallocation rounds need more than {total} training steps")
        return phase_bounds(total, self.rounds, self.config.realloc.span), total

    def _stage_train(self, phase: int, run_id: str) -> tuple[dict[str, str], dict[str, float]]:
        assert self.tracker is not None
        dataset = open_dataset(self.data_root)
        vocab = dataset.vocab()
        model_config = dataclasses.replace(self.config.model, vocab_size=len(vocab))
        bounds, total = self._schedule(dataset)
        lightrnn = model_config.kind == "lightrnn"
        allocation_uri = self.allocation_uri(phase) if lightrnn else ""
        if lightrnn and phase == 0 and not storage.exists(allocation_uri):
            with storage.atomic_write(allocation_uri) as f:
                initial_allocation(vocab.counts, self.config.realloc, self.config.train.seed).save(f)
        job = DistConfig(
            data=self.data_root,
            output=self.path("train"),
            name=f"phase-{phase}",
            workers=self.options.workers,
            use_gpu=self.options.use_gpu,
            allocation=allocation_uri,
            checkpoint_every=self.options.checkpoint_every,
            max_failures=self.options.max_failures,
            stop_step=bounds[phase + 1],
            init_checkpoint=self.records[f"train-{phase - 1}"]["outputs"]["checkpoint"] if phase else "",
            mlflow_tracking_uri=self.tracking_uri,
            mlflow_run_id=run_id,
        )
        _log(f"[train] phase {phase}: steps {bounds[phase]}..{bounds[phase + 1]} of {total}")
        run_dir = self.path("train", job.name)
        resume = storage.exists(storage.join(run_dir, "checkpoint_manager_snapshot.json"))
        finished = _latest_checkpoint(run_dir) if resume else None
        if finished and load_checkpoint_state(finished)["step"] >= job.stop_step:
            _log(f"[train] phase {phase} had finished before the interruption: {finished}")
            result = {"checkpoint": finished}
        else:
            result = run_training(model_config, self.config.train, job, resume=resume)
        checkpoint = result["checkpoint"]
        if not checkpoint:
            raise PipelineError(f"phase {phase} left no checkpoint under {run_dir}")
        metrics = {
            k: float(result[k])
            for k in ("valid_ppl", "words_per_s", "steps", "train_seconds")
            if result.get(k) is not None and math.isfinite(float(result[k]))
        }
        if result.get("window_train_loss") is not None:
            metrics["train_loss"] = float(result["window_train_loss"])
        if lightrnn:
            self._log_allocation(phase, vocab.counts, run_id)
        self._log_curves((f"train-{phase}", run_id))
        return {"checkpoint": checkpoint, "allocation": allocation_uri}, metrics

    def _stage_costs(self, phase: int, _: str) -> tuple[dict[str, str], dict[str, float]]:
        out = self.path(f"costs-{phase}", "head_inputs.npz")
        t = self.config.train
        parts = self.options.cost_tasks or self.options.workers
        checkpoint = self.records[f"train-{phase}"]["outputs"]["checkpoint"]
        info = tasks.accumulate_costs(
            checkpoint, self.data_root, parts, t.batch_size, t.bptt, self.config.realloc.cost_tokens, out
        )
        _log(f"[costs] {info['tokens']:,} targets, {info['words_seen']:,} distinct words, {parts} Ray tasks")
        return {"head_inputs": out}, {k: float(v) for k, v in info.items()}

    def _stage_realloc(self, phase: int, run_id: str) -> tuple[dict[str, str], dict[str, float]]:
        assert self.tracker is not None
        checkpoint = self.records[f"train-{phase}"]["outputs"]["checkpoint"]
        sums = self.records[f"costs-{phase}"]["outputs"]["head_inputs"]
        vocab_size = int(self.records["data"]["metrics"]["vocab_size"])
        out = self.allocation_uri(phase + 1)
        stats = tasks.reallocate(checkpoint, sums, self.config.realloc, vocab_size, out)
        _log(
            f"[realloc] {stats['words_moved']:,} words moved; cost {stats['cost_before']:.6g} -> "
            f"{stats['cost_after']:.6g} in {stats['seconds']:.1f}s ({self.config.realloc.method})"
        )
        numeric = {k: float(v) for k, v in stats.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        return {"allocation": out}, numeric

    def _stage_evaluate(self, _: int, __: str) -> tuple[dict[str, str], dict[str, float]]:
        checkpoint = self.records[f"train-{self.rounds}"]["outputs"]["checkpoint"]
        t = self.config.train
        metrics = tasks.evaluate_checkpoint(checkpoint, self.data_root, t.eval_batch_size, t.bptt)
        _log("[evaluate] " + ", ".join(f"{k} {v:,.2f}" for k, v in metrics.items()))
        return {"checkpoint": checkpoint}, metrics

    def _stage_export(self, _: int, run_id: str) -> tuple[dict[str, str], dict[str, float]]:
        """fp32 and int8 exports (lightrnn.export) to ROOT/export*, to MLflow, and as a pyfunc model."""
        assert self.tracker is not None
        checkpoint = self.records[f"train-{self.rounds}"]["outputs"]["checkpoint"]
        model = tasks.model_from_checkpoint(checkpoint)
        vocab = open_dataset(self.data_root).vocab()
        outputs: dict[str, str] = {}
        metrics: dict[str, float] = {}
        with temp_dir() as tmp:
            for key, quantize in (("model", None), ("model_int8", "int8")):
                local = Path(tmp) / key
                save_model(local, model, vocab, quantize=quantize)
                out = self.path("export" if quantize is None else "export-int8")
                files = sorted(p for p in local.iterdir() if p.is_file())
                # manifest.json last: it marks a complete export (lightrnn.export)
                for path in sorted(files, key=lambda p: p.name == "manifest.json"):
                    storage.write_bytes(storage.join(out, path.name), path.read_bytes())
                metrics[f"{key.replace('model', 'export')}_mb"] = sum(p.stat().st_size for p in files) / 1e6
                outputs[key] = out
                # the files as they are; `model` is the name of the pyfunc model below
                artifact = "export" if quantize is None else "export-int8"
                self.tracker.log_dir(run_id, local, artifact)
                self.tracker.log_dir(self.tracker.parent_id, local, artifact)
            with mlflow.start_run(run_id=self.tracker.parent_id):
                outputs["mlflow_model"] = log_pyfunc_model(Path(tmp) / "model", name="model")
        _log(
            f"[export] {outputs['model']} ({metrics['export_mb']:.1f} MB), {outputs['model_int8']} "
            f"({metrics['export_int8_mb']:.1f} MB), MLflow model {outputs['mlflow_model']}"
        )
        return outputs, metrics

    # -- plots ---------------------------------------------------------------------------

    def _log_allocation(self, phase: int, counts_V: Any, run_id: str) -> None:
        assert self.tracker is not None
        with storage.open(self.allocation_uri(phase), "rb") as f:
            allocation = Allocation.load(f)
        with temp_dir() as tmp:
            table = Path(tmp) / f"allocation_phase-{phase}.parquet"
            allocation.save(table)
            self.tracker.log_file(run_id, table, "allocation")
            image = Path(tmp) / f"allocation_phase-{phase}.png"
            plot_allocation(allocation, counts_V, f"word table, phase {phase}", image)
            self.tracker.log_file(self.tracker.parent_id, image, "plots")

    def _log_curves(self, current: tuple[str, str]) -> None:
        """Redraw the learning curves of every phase so far (and the one just trained) on the parent run."""
        assert self.tracker is not None
        runs = [(s, r["mlflow_run_id"]) for s, r in self.records.items() if s.startswith("train-")]
        with temp_dir() as tmp:
            image = Path(tmp) / "learning_curves.png"
            plot_learning_curves(self.tracker, [*runs, current], image)
            self.tracker.log_file(self.tracker.parent_id, image, "plots")


def _latest_checkpoint(run_dir: str) -> str | None:
    """The newest `checkpoint_<timestamp>` folder of a Ray Train run (names sort by time)."""
    names = [n for n in storage.listdir(run_dir) if n.startswith("checkpoint_") and not n.endswith(".json")]
    return storage.join(run_dir, max(names)) if names else None


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def run_pipeline(config: RunConfig, options: PipelineOptions) -> dict[str, Any]:
    """Run (or finish) the pipeline for `config` under `options.root`; Ray must be initialised."""
    return Pipeline(config, options).run()
