"""The checkpoint hook: every rank reports (``ray.train.report`` is a barrier); rank 0 writes the checkpoint
through ``engine.checkpoint`` and uploads it itself, retried over ``data.storage_retry_s`` with the commit
marker last, and only then registers it with Ray Train (which copies nothing more). A checkpoint that could
not be uploaded is not registered: the previous one stays the latest, and the run goes on or stops
(``checkpoint.on_upload_failure``). The best model and the progress files are uploaded with a short window
and, when that fails, again at the next checkpoint: they never stop training."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from engine import checkpoint as ckpt
from engine import collectives
from engine.config import to_dict
from engine.errors import CheckpointUploadFailed
from engine.hooks import Hook, StepContext
from pipeline import storage

SIDE_UPLOAD_WINDOW_S = 10.0  # best/ and progress files: tried again at the next checkpoint


class CheckpointHook(Hook):
    exempt = True

    def __init__(self, w) -> None:
        self.w = w
        self._pending_best = w.publisher.log_dir / ".best-pending"  # a best model whose upload failed

    def due(self, ctx: StepContext) -> bool:
        return ctx.save and not ctx.rolled_back

    def after_step(self, ctx: StepContext) -> None:
        w = self.w
        positions = collectives.gather_objects(w.loader.state_dict())
        metrics = {**w.metrics, **ctx.metrics, "step": ctx.step}
        name = checkpoint_name(ctx.step, w.state.rollbacks)
        if w.rank != 0:
            w.report(metrics, None, name)
            return
        uri = self._write(metrics, positions, name)
        w.report(metrics, uri, name)
        if uri is not None:
            w.last_checkpoint, w.last_checkpoint_step = uri, ctx.step
        self._side_uploads()

    def _write(self, metrics: dict, positions: list[dict], name: str) -> str | None:
        """Saves, uploads and commits ``name``; its URI, or None when the upload failed for good."""
        w, state = self.w, self.w.state
        state.optimizer, state.data_positions, state.history = w.optimizer.state_dict(), positions, w.log.history
        best = "AP" in metrics and metrics["AP"] > state.best_ap
        if best:
            state.best_ap, metrics["best"] = metrics["AP"], True
        config, categories = to_dict(w.cfg), w.loader.dataset.manifest["categories"]
        uri = storage.join(w.run_uri, name)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt.save(Path(tmp), w.net, state, config, metrics, categories, extra_files=w.log.files())
            if best and w.cfg.checkpoint.keep_best:
                self._stage_best(Path(tmp))
            try:
                ckpt.upload_folder(Path(tmp), uri)
            except storage.StorageError as e:
                self._upload_failed(uri, metrics["step"], e)
                return None
        return uri

    def _upload_failed(self, uri: str, step: int, error: storage.StorageError) -> None:
        w = self.w
        previous = f"{w.last_checkpoint} (step {w.last_checkpoint_step})" if w.last_checkpoint else "none yet"
        message = f"the checkpoint of step {step} could not be written to {uri} ({error}); the latest is {previous}"
        w.log.event(step, "checkpoint_failed", uri=uri, error=str(error)[:500])
        if w.cfg.checkpoint.on_upload_failure == "stop":
            raise CheckpointUploadFailed(f"{message}. Stopped (checkpoint.on_upload_failure=stop)")
        print(f"WARNING: {message}; training goes on (checkpoint.on_upload_failure=stop ends the run instead)",
              flush=True)  # fmt: skip

    def _stage_best(self, directory: Path) -> None:
        """best/ is the checkpoint's model, config and metrics: kept locally until its upload succeeds."""
        shutil.rmtree(self._pending_best, ignore_errors=True)
        self._pending_best.mkdir(parents=True)
        for name in (ckpt.MODEL, ckpt.CONFIG, ckpt.METRICS, ckpt.CATEGORIES, ckpt.THRESHOLDS):
            if (directory / name).exists():
                shutil.copy(directory / name, self._pending_best / name)
        ckpt.commit(self._pending_best, int(self.w.state.step))

    def _side_uploads(self) -> None:
        """best/ (if a new one is pending) and the progress files; a failure is logged and tried again later."""
        w = self.w
        if self._pending_best.exists():
            try:
                ckpt.upload_folder(self._pending_best, storage.join(w.run_uri, ckpt.BEST), SIDE_UPLOAD_WINDOW_S)
                shutil.rmtree(self._pending_best, ignore_errors=True)
            except storage.StorageError as e:
                print(f"WARNING: best/ not uploaded yet ({e}); trying again at the next checkpoint", flush=True)
        w.publisher.publish(SIDE_UPLOAD_WINDOW_S)


def checkpoint_name(step: int, rollbacks: int) -> str:
    """``checkpoint_NNNNNNNN``; after a rollback the steps are trained again under ``..._rN`` names, so that a
    rotated-out checkpoint of the first pass never shares a folder with a newer one."""
    name = ckpt.checkpoint_name(step)
    return f"{name}_r{rollbacks}" if rollbacks else name
