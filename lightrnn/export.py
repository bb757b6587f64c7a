"""Save and load a trained model as plain files, with checksums and an optional int8 copy.

DIR/model.pt            state dict only (loaded with weights_only=True); fp32, or int8 weights
                        plus per-row scales (`quantize="int8"`)
DIR/config.json         ModelConfig as JSON
DIR/vocab.parquet       Vocabulary.save
DIR/allocation.parquet  Allocation.save (LightRNN only): the one copy of the word -> cell table;
                        the model's row_of / col_of / occupied_RC buffers are rebuilt from it
                        (at V = 10M they would add 90 MB to model.pt)
DIR/manifest.json       written last, the commit: format, weights, sizes and sha256 per file

`load_model` trusts only what the manifest lists, verifies every checksum and that the
pieces fit together (vocabulary size, allocation, state-dict names and shapes), and
names the file at fault when they do not. It reads a local folder; `pipeline.models`
fetches exports from object stores and MLflow first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch

from lightrnn.allocation import Allocation
from lightrnn.config import ModelConfig, from_dict
from lightrnn.io import atomic_path
from lightrnn.model import LanguageModel, LightRNN, build_model
from lightrnn.vocab import Vocabulary

FORMAT = "lightrnn-export"
FORMAT_VERSION = 1
WEIGHTS = ("fp32", "int8")
SCALE_SUFFIX = ".int8_scale"  # model.pt key of the per-row scales of an int8 tensor


class ExportError(ValueError):
    """An export folder that is incomplete, corrupt, or whose pieces do not fit together."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- int8 weights ---------------------------------------------------------------------


def quantize_int8(weight_RK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: weight ~= q * scale[:, None], q in -127..127. Returns (q_RK, scale_R)."""
    w = weight_RK.detach().float()
    scale_R = w.abs().amax(dim=1) / 127.0
    scale_R = torch.where(scale_R > 0, scale_R, torch.ones_like(scale_R))  # an all-zero row stays zero
    q_RK = torch.round(w / scale_R[:, None]).clamp_(-127, 127).to(torch.int8)
    return q_RK, scale_R


def dequantize_int8(q_RK: torch.Tensor, scale_R: torch.Tensor) -> torch.Tensor:
    return q_RK.float() * scale_R[:, None]


def _is_quantizable(tensor: torch.Tensor) -> bool:
    # the matrices hold nearly all the bytes; biases and LayerNorm-like vectors stay fp32
    return tensor.dtype.is_floating_point and tensor.dim() == 2


def export_state(model: LanguageModel, quantize: str | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict that goes into model.pt, and the names stored as int8 (empty for fp32)."""
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None (fp32) or 'int8', got {quantize!r}")
    state: dict[str, torch.Tensor] = {}
    quantized: list[str] = []
    for name, tensor in model.state_dict().items():  # the word table is not in it: allocation.parquet
        tensor = tensor.detach() if tensor.is_meta else tensor.detach().cpu()  # meta: sizing a model not built
        if quantize == "int8" and _is_quantizable(tensor):
            state[name], state[name + SCALE_SUFFIX] = quantize_int8(tensor)
            quantized.append(name)
        else:
            state[name] = tensor
    return state, quantized


def _dequantize_state(state: dict[str, torch.Tensor], quantized: list[str]) -> dict[str, torch.Tensor]:
    out = dict(state)
    for name in quantized:
        if name not in out or name + SCALE_SUFFIX not in out:
            raise ExportError(f"model.pt lacks the int8 tensor or the scales of {name!r} that the manifest lists")
        out[name] = dequantize_int8(out[name], out.pop(name + SCALE_SUFFIX))
    return out


# -- save -----------------------------------------------------------------------------


def save_model(
    directory: str | os.PathLike[str], model: LanguageModel, vocab: Vocabulary, quantize: str | None = None
) -> Path:
    """Write the model to `directory`; manifest.json is written last and marks it complete.

    `quantize="int8"` stores every 2-D weight as int8 with one fp32 scale per row
    (about 4x smaller); `load_model` dequantizes to fp32.
    """
    if len(vocab) != model.vocab_size:
        raise ExportError(f"the vocabulary has {len(vocab)} words but the model was built for {model.vocab_size}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # the folder is uncommitted until the new manifest lands
    state, quantized = export_state(model, quantize)
    with atomic_path(out / "model.pt", suffix=".pt") as tmp:
        torch.save(state, tmp)
    vocab.save(out / "vocab.parquet")
    files = ["model.pt", "config.json", "vocab.parquet"]
    if isinstance(model, LightRNN):
        model.allocation().save(out / "allocation.parquet")
        files.append("allocation.parquet")
    text = json.dumps(dataclasses.asdict(model.config), indent=2)
    with atomic_path(out / "config.json") as tmp:
        Path(tmp).write_text(text)
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "kind": model.config.kind,
        "vocab_size": model.vocab_size,
        "weights": quantize or "fp32",
        "quantized": quantized,
        "files": {name: {"bytes": (out / name).stat().st_size, "sha256": sha256_file(out / name)} for name in files},
    }
    with atomic_path(out / "manifest.json") as tmp:
        Path(tmp).write_text(json.dumps(manifest, indent=2))
    return out


def export_bytes(directory: str | os.PathLike[str]) -> dict[str, int]:
    """Bytes of every file an export's manifest lists, and their `total`."""
    files = read_manifest(Path(directory))["files"]
    sizes = {name: int(entry["bytes"]) for name, entry in files.items()}
    sizes["total"] = sum(sizes.values())
    return sizes


# -- load -----------------------------------------------------------------------------


def read_manifest(src: Path) -> dict:
    if not (src / "manifest.json").exists():
        if not (src / "config.json").exists():
            raise FileNotFoundError(f"{src} holds no saved model (config.json missing): was save_model run to the end?")
        raise FileNotFoundError(
            f"{src} has config.json but no manifest.json: an export from before checksums, or an "
            "interrupted save_model; save the model again with lightrnn.export.save_model"
        )
    try:
        manifest = json.loads((src / "manifest.json").read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{src / 'manifest.json'} is not valid JSON: {e}") from e
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise ExportError(
            f"{src / 'manifest.json'} is not a {FORMAT} v{FORMAT_VERSION} manifest "
            f"(format {manifest.get('format')!r}, version {manifest.get('version')!r})"
        )
    if manifest.get("weights") not in WEIGHTS:
        raise ExportError(f"{src / 'manifest.json'}: weights must be one of {WEIGHTS}, got {manifest.get('weights')!r}")
    return manifest


def verify_export(directory: str | os.PathLike[str]) -> dict:
    """Check every file the manifest lists against its size and sha256; return the manifest."""
    src = Path(directory)
    manifest = read_manifest(src)
    for name, entry in manifest["files"].items():
        path = src / name
        if not path.exists():
            raise ExportError(f"{path} is missing but the manifest lists it: the export is incomplete, re-export")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise ExportError(
                f"{path} is corrupt: sha256 {digest[:16]}... does not match the manifest's {entry['sha256'][:16]}...; "
                "copy or re-export the model again"
            )
    return manifest


def _check_state_shapes(model: LanguageModel, state: dict[str, torch.Tensor], src: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k} {tuple(state[k].shape)} (config.json and the allocation need {tuple(expected[k].shape)})"
        for k in sorted(set(expected) & set(state))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        parts = [f"missing {missing}"] * bool(missing) + [f"unexpected {unexpected}"] * bool(unexpected) + wrong
        raise ExportError(f"{src / 'model.pt'} does not fit config.json: " + "; ".join(parts))


def load_model(directory: str | os.PathLike[str], map_location: str = "cpu") -> tuple[LanguageModel, Vocabulary]:
    """Rebuild a model saved by `save_model`, in eval mode, after verifying the export."""
    src = Path(directory)
    manifest = verify_export(src)
    config = from_dict(ModelConfig, json.loads((src / "config.json").read_text()))
    if config.kind != manifest["kind"] or config.vocab_size != manifest["vocab_size"]:
        raise ExportError(
            f"{src / 'config.json'} describes a {config.kind} model of {config.vocab_size} words, the manifest a "
            f"{manifest['kind']} model of {manifest['vocab_size']}"
        )
    vocab = Vocabulary.load(src / "vocab.parquet")
    if len(vocab) != config.vocab_size:
        raise ExportError(
            f"{src / 'vocab.parquet'} holds {len(vocab)} words but config.json has vocab_size {config.vocab_size}: "
            "the vocabulary is not the model's"
        )
    allocation = None
    if config.kind == "lightrnn":
        if "allocation.parquet" not in manifest["files"]:
            raise ExportError(f"{src}: a LightRNN export needs allocation.parquet, and the manifest lists none")
        allocation = Allocation.load(src / "allocation.parquet")
        if allocation.vocab_size != config.vocab_size:
            raise ExportError(
                f"{src / 'allocation.parquet'} places {allocation.vocab_size} words but the vocabulary has "
                f"{config.vocab_size}: the allocation is not the model's"
            )
    state = torch.load(src / "model.pt", map_location=map_location, weights_only=True)
    state = _dequantize_state(state, list(manifest["quantized"]))
    with torch.device("meta"):  # shapes only: check before allocating a possibly large model
        probe = build_model(config, allocation)
    _check_state_shapes(probe, state, src)
    model = build_model(config, allocation)
    model.load_state_dict(state)
    return model.to(map_location).eval(), vocab
