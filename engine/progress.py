"""What a user sees while training: a progress line every N steps, metrics.jsonl, TensorBoard scalars,
a PNG of predictions after each evaluation, loss/AP curves, and the best model by AP."""

from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from engine.config import TrainConfig
from pipeline import storage

_KEYS = ("loss", "loss_cls", "loss_box")


class ProgressLog:
    """Rank 0 writes; every rank takes part in the loss average (a collective at each flush)."""

    def __init__(
        self, cfg: TrainConfig, rank: int, world_size: int, log_dir: Path, history: list[dict], start_step: int
    ) -> None:
        self.cfg, self.rank, self.world_size, self.log_dir = cfg, rank, world_size, log_dir
        self.history = list(history)
        self.start_step, self.started = start_step, time.perf_counter()
        self._sums = torch.zeros(len(_KEYS))
        self._images = self._steps = 0
        self._waited = self._busy = 0.0
        self._latest: dict = {}
        self._writer = None
        self.predictions_png: Path | None = None
        self._published: dict[Path, tuple[int, int]] = {}
        if rank == 0:
            log_dir.mkdir(parents=True, exist_ok=True)
            jsonl = log_dir / "metrics.jsonl"
            if self.history and not jsonl.exists():  # resumed on another node: the whole run in one file
                jsonl.write_text("".join(json.dumps(entry) + "\n" for entry in self.history))
            if cfg.log.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(log_dir / "tensorboard"))

    def step(self, losses: dict, lr: float, num_images: int, waited: float, seconds: float) -> None:
        # Detached tensors are summed on the device: no host sync until flush.
        self._sums = self._sums.to(losses["loss"].device) + torch.stack([losses[k].detach().float() for k in _KEYS])
        self._images += num_images
        self._steps += 1
        self._waited += waited
        self._busy += seconds
        self._lr = lr

    def flush(self, step: int) -> None:
        values = torch.cat(
            [
                self._sums / max(1, self._steps),
                torch.tensor([self._images / max(self._busy, 1e-9)], device=self._sums.device),
            ]
        )
        if self.world_size > 1:
            dist.all_reduce(values)
            values[: len(_KEYS)] /= self.world_size  # mean loss; images/s adds up over ranks
        loss, loss_cls, loss_box, img_s = values.tolist()
        wait_share = self._waited / max(self._busy, 1e-9)
        self._latest = dict(
            loss=loss, loss_cls=loss_cls, loss_box=loss_box, lr=self._lr, images_per_s=img_s, data_wait=wait_share
        )
        self._sums = torch.zeros_like(self._sums)
        self._images = self._steps = 0
        self._waited = self._busy = 0.0
        if self.rank != 0:
            return
        total = self.cfg.optim.max_iters
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(1, step - self.start_step) * (total - step)
        print(
            f"step {step}/{total} | loss {loss:.4f} (focal {loss_cls:.4f}, box {loss_box:.4f}) | lr {self._lr:.2e}"
            f" | {img_s:.1f} img/s | data wait {wait_share:.0%} | eta {_duration(eta)}",
            flush=True,
        )
        self._record({"step": step, **self._latest})

    def event(self, step: int, name: str, **fields) -> None:
        """Rank 0: a line such as ``{"step": 10, "event": "resumed"}`` (plus ``fields``) in metrics.jsonl."""
        self._record({"step": step, "event": name, **fields})

    def latest(self) -> dict:
        return dict(self._latest)

    def evaluation(self, step: int, result, dataset) -> None:
        """Rank 0: metrics table, history, predictions PNG and curves PNG."""
        from engine.coco_eval import format_metrics_table
        from engine.visualize import denormalize, draw_detections, grid, plot_curves

        print(
            f"evaluation at step {step} on {result.num_images} images\n{format_metrics_table(result.metrics)}",
            flush=True,
        )
        self._record({"step": step, **result.metrics})
        names = {c["label"]: c["name"] for c in dataset.manifest["categories"]}
        class_names = [names[i] for i in range(len(names))]
        drawn = [
            draw_detections(
                denormalize(image[None])[0],
                det["boxes"],
                det["labels"],
                det["scores"],
                class_names,
                gt_boxes=gt["boxes"],
                gt_labels=gt["labels"],
            )
            for image, det, gt in result.samples
        ]
        if drawn:
            self.predictions_png = self.log_dir / f"predictions_{step:08d}.png"
            grid(drawn, cols=min(4, len(drawn))).save(self.predictions_png)
        plot_curves(self.history, self.log_dir / "curves.png")

    def copy_artifacts(self, directory: Path) -> None:
        """Puts the run's log files into a checkpoint directory, so they reach the run's storage."""
        for path in (self.log_dir / "metrics.jsonl", self.log_dir / "curves.png", self.predictions_png):
            if path is not None and path.exists():
                shutil.copy(path, directory / path.name)

    def publish(self) -> None:
        """Rank 0, object storage only: uploads the progress files that changed (metrics.jsonl, PNGs,
        TensorBoard events) to ``{storage_path}/{name}/logs/``, so they can be followed from anywhere
        while rank 0 runs on some worker node. A local storage path already holds them."""
        remote = self.cfg.checkpoint.storage_path
        if self.rank != 0 or "://" not in remote:
            return
        root = storage.join(storage.join(remote, self.cfg.checkpoint.name), "logs")
        for path in sorted(p for p in self.log_dir.rglob("*") if p.is_file()):
            stat = path.stat()
            if self._published.get(path) != (stat.st_size, stat.st_mtime_ns):
                storage.write_bytes(storage.join(root, path.relative_to(self.log_dir).as_posix()), path.read_bytes())
                self._published[path] = (stat.st_size, stat.st_mtime_ns)

    def save_best(self, net: torch.nn.Module, metrics: dict) -> None:
        """The best model by AP, beside the checkpoints: ``{storage_path}/{name}/best/``."""
        run = storage.join(storage.absolute(self.cfg.checkpoint.storage_path), self.cfg.checkpoint.name)
        root = storage.join(run, "best")
        buf = io.BytesIO()
        torch.save(net.state_dict(), buf)
        storage.write_bytes(storage.join(root, "model.pt"), buf.getvalue())
        storage.write_bytes(storage.join(root, "metrics.json"), json.dumps(metrics, indent=1).encode())

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self.publish()

    def _record(self, entry: dict) -> None:
        self.history.append(entry)
        with open(self.log_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
        if self._writer is not None:
            for key, value in entry.items():
                if key != "step" and isinstance(value, int | float):
                    self._writer.add_scalar(key, value, entry["step"])
            self._writer.flush()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
