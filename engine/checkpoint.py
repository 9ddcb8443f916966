"""A checkpoint is a directory of named parts, written by rank 0 through this module and committed last.

model.pt         the unwrapped model's state dict (tensors only)
train.pt         plain types and tensors only (loaded with ``weights_only=True``): format version, step,
                 optimizer state, every rank's data position, metrics history, best AP, lr scale, rollbacks
config.json      the resolved TrainConfig
categories.json  the dataset's categories (label, COCO id, name)
metrics.json     the metrics reported with it
metrics.jsonl, curves.png, predictions_*.png   copies of the progress files, when there are any
commit.json      written last: the format version, the step and every other file's size. A folder without
                 it, or whose files differ from it, is incomplete (its upload did not finish) and is refused.

``STORAGE/NAME/best/`` is a complete checkpoint of the best model by AP (no train.pt: nothing resumes from it).
"""

from __future__ import annotations

import json
import numbers
import pickle
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from pipeline import storage

FORMAT_VERSION = 2  # 1: before commit.json and the format field (still read)
MODEL = "model.pt"
TRAIN = "train.pt"
CONFIG = "config.json"
METRICS = "metrics.json"
CATEGORIES = "categories.json"
THRESHOLDS = "thresholds.json"  # per-class operating points of the last evaluation (engine.per_class)
COMMIT = "commit.json"
BEST = "best"
PREFIX = "checkpoint_"


def checkpoint_name(step: int) -> str:
    """Deterministic names, so a rerun after a failure overwrites rather than duplicates."""
    return f"{PREFIX}{step:08d}"


def checkpoint_step(uri: str) -> int | None:
    """The step in a ``.../checkpoint_NNNNNNNN`` name, or ``None``."""
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    digits = name.removeprefix(PREFIX).split("_", 1)[0]  # checkpoint_NNNNNNNN or checkpoint_NNNNNNNN_rK
    return int(digits) if name.startswith(PREFIX) and digits.isdigit() else None


@dataclass
class TrainState:
    """What a resumed run needs besides the weights."""

    step: int = 0
    optimizer: dict = field(default_factory=dict)
    data_positions: list[dict] = field(default_factory=list)  # index = rank
    history: list[dict] = field(default_factory=list)
    best_ap: float = -1.0
    lr_scale: float = 1.0  # product of the rollbacks' learning-rate factors
    rollbacks: int = 0

    def to_plain(self) -> dict:
        return plain({"format": FORMAT_VERSION, **{f.name: getattr(self, f.name) for f in fields(self)}})

    @classmethod
    def from_plain(cls, data: dict, source: str) -> TrainState:
        version = data.get("format", 1)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"{source} is checkpoint format {version!r}; this version of the project reads formats 1 to "
                f"{FORMAT_VERSION}: update the project to read it"
            )
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def plain(value: Any, where: str = "train state") -> Any:
    """``value`` as the types ``torch.load(weights_only=True)`` accepts (numpy scalars become Python numbers);
    ``TypeError`` naming the field for anything else, so that a checkpoint never needs unpickling of code."""
    if value is None or isinstance(value, bool | str | torch.Tensor):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, dict):
        return {k: plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{where} is a {type(value).__name__}: a checkpoint holds only plain types and tensors")


def save(
    directory: Path,
    model: torch.nn.Module,
    state: TrainState | None,
    config: dict,
    metrics: dict,
    categories: list[dict],
    extra_files: tuple[Path, ...] = (),
) -> None:
    """Writes every part into ``directory``, then ``commit.json``. ``state=None``: a model-only checkpoint."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CATEGORIES).write_text(json.dumps(categories, indent=1))
    torch.save(model.state_dict(), directory / MODEL)
    if state is not None:
        torch.save(state.to_plain(), directory / TRAIN)
    (directory / CONFIG).write_text(json.dumps(config, indent=1))
    (directory / METRICS).write_text(json.dumps(plain(metrics, "metrics"), indent=1))
    for path in extra_files:
        if path.is_file():
            (directory / path.name).write_bytes(path.read_bytes())
    commit(directory, int(metrics.get("step", state.step if state else 0)))


def commit(directory: Path, step: int) -> None:
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file() and p.name != COMMIT}
    (directory / COMMIT).write_text(json.dumps({"format": FORMAT_VERSION, "step": step, "files": files}, indent=1))


def incomplete_reason(uri: str) -> str | None:
    """``None`` when the checkpoint at ``uri`` (folder or object-storage prefix) is complete, else why not.
    A folder of format 1 (written before commit markers) counts as complete when its train.pt says so."""
    commit_uri = storage.join(uri, COMMIT)
    if storage.size(commit_uri) is None:
        if _legacy(uri):
            return None
        return f"it has no {COMMIT}, so its upload did not finish: a worker stopped while writing it"
    try:
        files = json.loads(storage.read_bytes(commit_uri))["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"its {COMMIT} is unreadable ({e})"
    for name, expected in files.items():
        got = storage.size(storage.join(uri, name))
        if got != expected:
            return f"{name} is {'missing' if got is None else f'{got} bytes'}, {COMMIT} lists {expected} bytes"
    return None


def _legacy(uri: str) -> bool:
    train = storage.join(uri, TRAIN)
    if storage.size(train) is None or storage.size(storage.join(uri, CONFIG)) is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / TRAIN
        path.write_bytes(storage.read_bytes(train))
        return "format" not in load_trusted(path)


def latest_complete(run_uri: str, before_step: int | None = None) -> str | None:
    """The newest complete ``checkpoint_NNNNNNNN`` under a run's folder (older than ``before_step`` if given)."""
    steps = [(checkpoint_step(uri), uri) for uri in storage.list_matching(run_uri, f"{PREFIX}*")]
    candidates = sorted((s, u) for s, u in steps if s is not None and (before_step is None or s < before_step))
    for _, uri in reversed(candidates):
        if incomplete_reason(uri) is None:
            return uri
    return None


def resolve(uri: str) -> str:
    """The complete checkpoint that ``uri`` names: a checkpoint folder (or ``best/``) as it is, a run folder's
    newest complete checkpoint. ``ValueError`` for an incomplete checkpoint (naming the newest complete one of
    its run) or for a folder that holds none."""
    uri = uri.rstrip("/")
    reason = incomplete_reason(uri)
    if reason is None:
        return uri
    if storage.size(storage.join(uri, MODEL)) is not None or checkpoint_step(uri) is not None:
        latest = latest_complete(uri.rsplit("/", 1)[0]) if "/" in uri else None
        other = f"the newest complete checkpoint of this run is {latest}" if latest else "its run has no complete one"
        raise ValueError(f"{uri} is an incomplete checkpoint ({reason}); {other}")
    latest = latest_complete(uri)
    if latest is not None:
        return latest
    raise ValueError(
        f"{uri} is not a checkpoint directory: no {COMMIT}, and no complete {PREFIX}NNNNNNNN inside it. Pass a "
        f"{PREFIX}NNNNNNNN folder, a run's best/ folder or the run's folder"
    )


def fetch(uri: str, into: Path) -> Path:
    """A complete checkpoint as a local folder: local paths as they are, others (s3://...) downloaded into
    ``into``. ``uri`` may name a run folder (its newest complete checkpoint is taken)."""
    uri = resolve(uri)
    if "://" not in uri or uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    fs, inner = storage.filesystem(uri)
    storage.with_retries("downloading", uri, lambda: fs.get(inner.rstrip("/") + "/", str(into) + "/", recursive=True))
    return into


def load_trusted(path: Path) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain types only. A file that needs more (a crafted
    pickle, or one from an incompatible version) is a ``ValueError``, and none of its code runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{path} was not loaded: it needs arbitrary unpickling ({first[:200]}), so it is untrusted or from an "
            "incompatible version. Use a checkpoint written by this project"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path} is not a readable torch file ({type(e).__name__}: {e})") from None


def load_weights(directory: Path, model: torch.nn.Module) -> None:
    try:
        model.load_state_dict(load_trusted(directory / MODEL))
    except RuntimeError as e:
        raise ValueError(f"{directory / MODEL} does not fit the configured model: {str(e).splitlines()[0]}") from None


def load_train_state(directory: Path) -> TrainState:
    if not (directory / TRAIN).exists():
        raise ValueError(f"{directory} has no {TRAIN}: it is a model-only checkpoint (best/?); training cannot resume")
    return TrainState.from_plain(load_trusted(directory / TRAIN), str(directory / TRAIN))


def read_config(directory: Path) -> dict:
    if not (directory / CONFIG).exists():
        raise ValueError(f"{directory} has no {CONFIG}: not a checkpoint of this project")
    return json.loads((directory / CONFIG).read_text())


def read_categories(directory: Path) -> list[dict] | None:
    path = directory / CATEGORIES
    return json.loads(path.read_text()) if path.exists() else None


def save_best(run_uri: str, model: torch.nn.Module, config: dict, categories: list[dict], metrics: dict) -> str:
    """Writes ``run_uri/best/`` as a complete model-only checkpoint: its old commit marker goes first and the
    new one last, so a reader never takes a half-replaced best/ for complete. Returns its URI."""
    best = storage.join(run_uri, BEST)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        save(directory, model, None, config, metrics, categories)
        upload_folder(directory, best)
    return best


def upload_folder(directory: Path, uri: str, window_s: float | None = None) -> None:
    """Copies a committed local checkpoint folder to ``uri`` (each write retried over ``window_s``, default the
    process's storage window): the old commit marker is removed first and the new one written last, so a
    reader never takes a half-written folder for complete. ``StorageError`` if a write fails for good."""
    storage.delete(storage.join(uri, COMMIT), window_s)
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.name != COMMIT:
            storage.write_bytes(storage.join(uri, path.name), path.read_bytes(), window_s)
    storage.write_bytes(storage.join(uri, COMMIT), (directory / COMMIT).read_bytes(), window_s)


@dataclass
class Restored:
    """A checkpoint read back for resuming: where from, the model's state dict, the train state, and the
    metrics reported with it (``metrics.json``; empty for a checkpoint written without them)."""

    uri: str
    weights: dict
    state: TrainState
    metrics: dict = field(default_factory=dict)


def restore(directory: Path, uri: str, run_uri: str) -> Restored | None:
    """The checkpoint Ray Train hands a restarted worker (``directory``, a local copy of ``uri``), or, when it is
    incomplete, the newest complete one of the run before it; ``None`` if the run has none (start afresh)."""
    reason = incomplete_reason(str(directory))
    if reason is None:
        return Restored(uri, load_trusted(directory / MODEL), load_train_state(directory), _metrics(directory))
    fallback = latest_complete(run_uri, before_step=checkpoint_step(uri))
    print(f"WARNING: {uri} is incomplete ({reason}); resuming from {fallback or 'the start'} instead", flush=True)
    if fallback is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = fetch(fallback, Path(tmp))
        return Restored(fallback, load_trusted(local / MODEL), load_train_state(local), _metrics(local))


def _metrics(directory: Path) -> dict:
    path = directory / METRICS
    return json.loads(path.read_text()) if path.exists() else {}
