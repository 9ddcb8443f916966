"""A checkpoint is a directory of named parts, written by rank 0 and handed to ``ray.train.report``.

model.pt      the unwrapped model's state dict
train.pt      optimizer state, step, every rank's data position, metrics history
config.json   the resolved TrainConfig
metrics.json  the metrics reported with it
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

MODEL = "model.pt"
TRAIN = "train.pt"
CONFIG = "config.json"
METRICS = "metrics.json"
CATEGORIES = "categories.json"


def checkpoint_name(step: int) -> str:
    """Deterministic names, so a rerun after a failure overwrites rather than duplicates."""
    return f"checkpoint_{step:08d}"


@dataclass
class TrainState:
    """What a resumed run needs besides the weights."""

    step: int = 0
    optimizer: dict = field(default_factory=dict)
    data_positions: list[dict] = field(default_factory=list)  # index = rank
    history: list[dict] = field(default_factory=list)
    best_ap: float = -1.0


def save(
    directory: Path, model: torch.nn.Module, state: TrainState, config: dict, metrics: dict, categories: list[dict]
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CATEGORIES).write_text(json.dumps(categories, indent=1))
    torch.save(model.state_dict(), directory / MODEL)
    torch.save(vars(state), directory / TRAIN)
    (directory / CONFIG).write_text(json.dumps(config, indent=1))
    (directory / METRICS).write_text(json.dumps(metrics, indent=1))


def load(directory: Path, model: torch.nn.Module | None = None) -> tuple[TrainState, dict]:
    """Loads the weights into ``model`` (if given); returns the train state and the saved config."""
    if not (directory / MODEL).exists():
        raise ValueError(f"{directory} is not a checkpoint: no {MODEL}")
    if model is not None:
        model.load_state_dict(torch.load(directory / MODEL, map_location="cpu", weights_only=True))
    train = directory / TRAIN
    state = TrainState(**torch.load(train, map_location="cpu", weights_only=False)) if train.exists() else TrainState()
    config = json.loads((directory / CONFIG).read_text()) if (directory / CONFIG).exists() else {}
    return state, config


def fetch(uri: str, into: Path) -> Path:
    """A checkpoint directory as a local path: local paths as they are, others (s3://...) downloaded."""
    if "://" not in uri or uri.startswith("file://"):
        path = Path(uri.removeprefix("file://"))
        if not (path / MODEL).exists():
            raise ValueError(f"{uri} is not a checkpoint directory (no {MODEL}): pass a checkpoint_NNNNNNNN folder")
        return path
    from pipeline import storage

    fs, inner = storage.filesystem(uri)
    if not storage.exists(storage.join(uri, MODEL)):
        raise ValueError(f"{uri} is not a checkpoint directory (no {MODEL}): pass a checkpoint_NNNNNNNN folder")
    storage.with_retries("downloading", uri, lambda: fs.get(inner.rstrip("/") + "/", str(into) + "/", recursive=True))
    return into
