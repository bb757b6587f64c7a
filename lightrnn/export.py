"""Save and load a trained model as plain files: state dict, config, vocabulary, allocation.

DIR/model.pt          state dict only (loaded with weights_only=True)
DIR/config.json       ModelConfig as JSON
DIR/vocab.parquet     Vocabulary.save
DIR/allocation.parquet  Allocation.save (LightRNN only)
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from lightrnn.allocation import Allocation
from lightrnn.config import ModelConfig, from_dict
from lightrnn.model import LanguageModel, LightRNN, build_model
from lightrnn.vocab import Vocabulary


def _atomic_write_bytes(path: Path, write: Callable[[str], object]) -> None:
    # torch.save names its zip archive after the file: keep a plain name with the real suffix
    fd, tmp = tempfile.mkstemp(prefix="tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_model(directory: str | os.PathLike[str], model: LanguageModel, vocab: Vocabulary) -> Path:
    """Write the model to `directory`; config.json is written last and marks it complete."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _atomic_write_bytes(out / "model.pt", lambda p: torch.save(state, p))
    vocab.save(out / "vocab.parquet")
    if isinstance(model, LightRNN):
        model.allocation().save(out / "allocation.parquet")
    text = json.dumps(dataclasses.asdict(model.config), indent=2)
    _atomic_write_bytes(out / "config.json", lambda p: Path(p).write_text(text))
    return out


def load_model(directory: str | os.PathLike[str], map_location: str = "cpu") -> tuple[LanguageModel, Vocabulary]:
    """Rebuild a model saved by `save_model`, in eval mode."""
    src = Path(directory)
    if not (src / "config.json").exists():
        raise FileNotFoundError(f"{src} holds no saved model (config.json missing): was save_model run to the end?")
    config = from_dict(ModelConfig, json.loads((src / "config.json").read_text()))
    vocab = Vocabulary.load(src / "vocab.parquet")
    allocation = Allocation.load(src / "allocation.parquet") if config.kind == "lightrnn" else None
    model = build_model(config, allocation)
    model.load_state_dict(torch.load(src / "model.pt", map_location=map_location, weights_only=True))
    return model.eval(), vocab
