"""Demo checkpoints: written atomically, read back with checks and clear errors.

A checkpoint is `torch.save` of one dict (`torch.load(weights_only=True)` reads it back, so
loading never runs pickled code):

    {"format": "qkv.demo.dates", "version": 1, "arch": "transformer" or "rnn",
     "model_config": {...TransformerConfig or RNNConfig fields...},
     "src_vocab": [characters], "tgt_vocab": [characters],
     "state_dict": {name: tensor}, "meta": {...anything JSON-like...}}

The training state that `qkv demo --resume` continues from (`train_state.pt`, written every
N steps, at the end and on Ctrl-C) is the same dict with format "qkv.demo.train_state" and
what training needs on top: "step" (optimiser steps done), "demo_config" (DemoConfig
fields), "optimizer" (its state_dict), "data" (the batch stream's position), "rng" (torch's
global generator) and "progress" (losses so far, examples seen, seconds). `load_checkpoint`
reads either file, so `qkv translate` can use a run's latest training state. "arch" says
which model the weights belong to (`qkv.nn.Transformer`, or `qkv.demo.rnn`'s GRU
encoder-decoder); a file without it holds a Transformer.

Atomic write: the bytes go to a temporary file in the same directory, are flushed to disk,
and only then `os.replace` puts the file in place (a rename, atomic on POSIX and Windows).
A crash or an exception half-way leaves the previous checkpoint untouched and no temporary
file behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import IO, Any

import torch

from ..nn import Transformer, TransformerConfig
from .dates import Vocab
from .rnn import RNNConfig, RNNEncoderDecoder

__all__ = [
    "FORMAT",
    "TRAIN_STATE_FORMAT",
    "VERSION",
    "Checkpoint",
    "CheckpointError",
    "TrainState",
    "atomic_write",
    "load_checkpoint",
    "load_train_state",
    "save_checkpoint",
    "save_train_state",
]

FORMAT = "qkv.demo.dates"
TRAIN_STATE_FORMAT = "qkv.demo.train_state"
VERSION = 1  # of both formats
# arch -> (model class, its config class)
_ARCHS = {"transformer": (Transformer, TransformerConfig), "rnn": (RNNEncoderDecoder, RNNConfig)}
Model = Transformer | RNNEncoderDecoder


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt, foreign, or does not fit its model."""


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the model (in eval mode), its vocabularies, and metadata."""

    model: Model  # a Transformer or an RNNEncoderDecoder: the same decoding interface
    src_vocab: Vocab
    tgt_vocab: Vocab
    meta: dict


@dataclass(frozen=True)
class TrainState:
    """Everything `--resume` needs to continue training exactly where it stopped."""

    step: int  # optimiser steps done
    demo_config: dict  # DemoConfig fields of the run
    model: Model  # the weights after `step` steps (train mode)
    src_vocab: Vocab
    tgt_vocab: Vocab
    optimizer: dict  # torch.optim.Optimizer.state_dict()
    data: dict  # BatchStream.state_dict(): where the batches are
    rng: torch.Tensor  # torch.get_rng_state()
    progress: dict  # per-step losses and accuracies, examples seen, seconds, threads


def _file_mode(path: Path) -> int:
    """The mode of the file being replaced, or 0666 minus the umask for a new one."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call `write(file)` on a temporary file beside `path`, then move it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600; keep what a plain open() gives
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (POSIX only)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def save_checkpoint(
    path: str | os.PathLike,
    model: Model,
    src_vocab: Vocab,
    tgt_vocab: Vocab,
    *,
    meta: dict | None = None,
) -> Path:
    """Write `model` and its vocabularies to `path` atomically; returns the path."""
    payload = _model_payload(FORMAT, model, src_vocab, tgt_vocab, meta)
    return atomic_write(path, lambda f: torch.save(payload, f))


def save_train_state(path: str | os.PathLike, state: TrainState) -> Path:
    """Write `state` to `path` atomically (a crash mid-write leaves the previous one)."""
    meta = {"step": state.step, "steps": state.demo_config.get("steps")}
    payload = {
        **_model_payload(TRAIN_STATE_FORMAT, state.model, state.src_vocab, state.tgt_vocab, meta),
        "step": state.step,
        "demo_config": dict(state.demo_config),
        "optimizer": state.optimizer,
        "data": state.data,
        "rng": state.rng,
        "progress": state.progress,
    }
    return atomic_write(path, lambda f: torch.save(payload, f))


def _model_payload(fmt: str, model: Model, src_vocab, tgt_vocab, meta) -> dict:
    arch = next((a for a, (cls, _) in _ARCHS.items() if type(model) is cls), None)
    if arch is None:
        raise TypeError(
            f"model must be a qkv.nn.Transformer or a qkv.demo.rnn.RNNEncoderDecoder; got "
            f"{type(model).__name__}"
        )
    return {
        "format": fmt,
        "version": VERSION,
        "arch": arch,
        "model_config": asdict(model.config),
        "src_vocab": src_vocab.to_list(),
        "tgt_vocab": tgt_vocab.to_list(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }


def _read(path: Path) -> Any:
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path} (train one with `qkv demo --out DIR`)")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (an interrupted copy?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip/pickle errors of every kind: report one clear line
        reason = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else ""
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or corrupt?): "
            f"{reason[:160] or type(e).__name__}"
        ) from e


def _check_state(model: Model, state: Any, path: Path) -> dict:
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: state_dict must map names to tensors")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit the model its config describes (missing "
            f"{missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{path}: weight {name} has shape {tuple(state[name].shape)}, the config "
                f"needs {tuple(tensor.shape)}"
            )
    return state


_KINDS = {FORMAT: "a model checkpoint", TRAIN_STATE_FORMAT: "a training state"}


def _check_header(path: Path, data: Any, formats: tuple[str, ...], what: str) -> dict:
    found = data.get("format") if isinstance(data, dict) else type(data).__name__
    if isinstance(found, str) and found in _KINDS and found not in formats:
        raise CheckpointError(f"{path} is {_KINDS[found]}, not {what}")
    if found not in formats:
        raise CheckpointError(f"{path} is not {what} (format {found!r})")
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {version!r}; this qkv reads version {VERSION}"
        )
    return data


def _load_model(path: Path, data: dict) -> tuple[Model, Vocab, Vocab]:
    arch = data.get("arch", "transformer")
    if not isinstance(arch, str) or arch not in _ARCHS:
        raise CheckpointError(
            f"{path} holds a model of arch {arch!r}; this qkv reads {sorted(_ARCHS)}"
        )
    model_class, config_class = _ARCHS[arch]
    try:
        config_fields = {f.name for f in fields(config_class)}
        raw = data["model_config"]
        config = config_class(**{k: v for k, v in raw.items() if k in config_fields})
        src_vocab, tgt_vocab = Vocab(data["src_vocab"]), Vocab(data["tgt_vocab"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: damaged config or vocabulary: {e}") from e
    if (len(src_vocab), len(tgt_vocab)) != (config.src_vocab_size, config.tgt_vocab_size):
        raise CheckpointError(
            f"{path}: vocabularies of {len(src_vocab)} and {len(tgt_vocab)} tokens do not "
            f"match the config's {config.src_vocab_size} and {config.tgt_vocab_size}"
        )
    model = model_class(config)
    model.load_state_dict(_check_state(model, data.get("state_dict"), path))
    return model, src_vocab, tgt_vocab


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint` (or a training state written by
    `save_train_state`: its model); CheckpointError with one clear line for a missing,
    truncated, corrupt, foreign or inconsistent file."""
    path = Path(path)
    data = _check_header(path, _read(path), (FORMAT, TRAIN_STATE_FORMAT), "a qkv demo checkpoint")
    model, src_vocab, tgt_vocab = _load_model(path, data)
    model.eval()
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
    return Checkpoint(model, src_vocab, tgt_vocab, meta)


def load_train_state(path: str | os.PathLike) -> TrainState:
    """Read a training state written by `save_train_state`, with the same checks as
    `load_checkpoint` and of every training field's type; the optimizer's and the batch
    stream's contents are checked against the model when training restores them."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"no training state at {path} to resume (run without --resume to start one)"
        )
    data = _check_header(path, _read(path), (TRAIN_STATE_FORMAT,), "a qkv demo training state")
    model, src_vocab, tgt_vocab = _load_model(path, data)
    kinds = {"step": int, "demo_config": dict, "optimizer": dict, "data": dict,
             "rng": torch.Tensor, "progress": dict}  # fmt: skip
    for key, kind in kinds.items():
        if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
            got = type(data.get(key)).__name__ if key in data else "nothing"
            raise CheckpointError(
                f"{path}: training state field {key!r} is {got}, not {kind.__name__}"
            )
    steps = data["demo_config"].get("steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= data["step"] <= steps:
        raise CheckpointError(f"{path}: step {data['step']} of {steps!r} steps is impossible")
    model.train()
    return TrainState(
        data["step"], data["demo_config"], model, src_vocab, tgt_vocab, data["optimizer"],
        data["data"], data["rng"], data["progress"],
    )  # fmt: skip
