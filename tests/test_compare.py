"""jobs.compare: every variant trained on the same data, one table, one MLflow parent with a nested run each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from jobs.compare import variant_overrides
from jobs.configs import TUNED, get_preset, tuned_overrides
from lightrnn.phases import phase_bounds
from tests.conftest import REPO


def test_variants_differ_only_in_the_output_layer() -> None:
    tiny = get_preset("tiny")
    configs = {
        name: tiny.with_overrides(variant_overrides(name, tiny))
        for name in ("full", "adaptive", "lightrnn-random", "lightrnn-frequency", "lightrnn-realloc")
    }
    assert {c.model.kind for c in configs.values()} == {"full", "adaptive", "lightrnn"}
    assert configs["lightrnn-frequency"].realloc.initial == "frequency"
    assert configs["lightrnn-realloc"].realloc.rounds == tiny.realloc.rounds > 0
    assert configs["lightrnn-random"].realloc.rounds == 0
    for config in configs.values():  # same LSTM, data and schedule
        assert (config.model.hidden_dim, config.model.num_layers, config.train, config.data) == (
            tiny.model.hidden_dim,
            tiny.model.num_layers,
            tiny.train,
            tiny.data,
        )


def test_each_baseline_gets_its_own_tuned_settings_and_the_presets_are_lightrnns() -> None:
    for name, kinds in TUNED.items():
        preset = get_preset(name)
        assert preset.model.kind == "lightrnn"
        for kind, overrides in kinds.items():
            assert kind in ("full", "adaptive") and overrides  # LightRNN's settings are the preset itself
            tuned = preset.with_overrides([*tuned_overrides(name, kind), f"model.kind={kind}"])
            assert tuned != preset.with_overrides([f"model.kind={kind}"])
    assert tuned_overrides("ptb", "lightrnn") == [] and tuned_overrides("tiny", "full") == []
    for name in ("ptb", "clueweb"):  # the recipe reallocates at 1/12 and 1/6 of the budget
        realloc = get_preset(name).realloc
        assert phase_bounds(1200, realloc.rounds, realloc.span) == [0, 100, 200, 1200]
    realloc = get_preset("wikitext2").realloc  # WikiText-2's table takes four, at 1/20 to 1/5
    assert phase_bounds(1200, realloc.rounds, realloc.span) == [0, 60, 120, 180, 240, 1200]
    assert realloc.stay_bonus == 1.0 and get_preset("ptb").realloc.stay_bonus == 0.0
    # WikiText-2 decays the learning rate to a hundredth, except for the full softmax; PTB to a tenth
    wikitext2 = get_preset("wikitext2")
    assert wikitext2.train.lr_min_ratio == 0.01 and get_preset("ptb").train.lr_min_ratio == 0.1
    for kind, ratio in (("full", 0.1), ("adaptive", 0.01)):
        tuned = wikitext2.with_overrides([*tuned_overrides("wikitext2", kind), f"model.kind={kind}"])
        assert tuned.train.lr_min_ratio == ratio


def test_compare_with_a_time_budget(tmp_path: Path) -> None:
    variants = ["full", "lightrnn-random", "lightrnn-realloc"]
    command = [sys.executable, "-m", "jobs.compare", "--config", "tiny", "--budget-minutes", "0.1"]
    command += ["--variants", ",".join(variants), "--out", str(tmp_path / "cmp"), "--parallel", "2", "--json"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["variant"] for r in rows] == variants
    for row in rows:  # every variant spends the 6 s budget of its CPU clock, reallocation included
        assert row["test_ppl"] > 1 and row["valid_ppl"] > 1 and row["words_per_s"] > 0
        assert row["clock"] == "cpu" and 6.0 <= row["train_seconds"] + row["realloc_seconds"] <= 6.0 * 1.1
    by_name = {r["variant"]: r for r in rows}
    assert by_name["lightrnn-random"]["embed_head_bytes"] < by_name["full"]["embed_head_bytes"] / 5
    assert len(by_name["lightrnn-realloc"]["words_moved"]) == 1
    assert "| lightrnn-realloc |" in done.stdout  # the printed table
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text()) == rows

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lightrnn-compare")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(children) == set(variants)
    for name, run in children.items():
        assert run.data.metrics["test_ppl"] == by_name[name]["test_ppl"]
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) >= 1
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id)} == {"comparison.md", "comparison.json"}
