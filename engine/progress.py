"""What a user sees while training: a progress line every N steps, metrics.jsonl, TensorBoard scalars,
a PNG of predictions after each evaluation, and loss/AP curves."""

from __future__ import annotations

import json
import time
from pathlib import Path

from engine.config import TrainConfig


class ProgressLog:
    """Rank 0 writes; on other ranks every method is a no-op. Collectives and uploads are elsewhere
    (``engine.hooks``, ``engine.publish``): this class only logs."""

    def __init__(self, cfg: TrainConfig, rank: int, log_dir: Path, history: list[dict], start_step: int) -> None:
        self.cfg, self.rank, self.log_dir = cfg, rank, log_dir
        self.history = list(history)
        self.start_step, self.started = start_step, time.perf_counter()
        self._writer = None
        self.predictions_png: Path | None = None
        if rank == 0:
            log_dir.mkdir(parents=True, exist_ok=True)
            jsonl = log_dir / "metrics.jsonl"
            if self.history and not jsonl.exists():  # resumed on another node: the whole run in one file
                jsonl.write_text("".join(json.dumps(entry) + "\n" for entry in self.history))
            if cfg.log.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(log_dir / "tensorboard"))

    def progress(self, step: int, values: dict, note: str = "") -> None:
        """Rank 0: the progress line (loss parts, lr, images/s, data wait, ETA) and a metrics.jsonl entry."""
        if self.rank != 0:
            return
        total = self.cfg.optim.max_iters
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(1, step - self.start_step) * (total - step)
        v = values
        print(
            f"step {step}/{total} | loss {v['loss']:.4f} (focal {v['loss_cls']:.4f}, box {v['loss_box']:.4f})"
            f" | lr {v['lr']:.2e} | {v['images_per_s']:.1f} img/s | data wait {v['data_wait']:.0%}"
            f" | eta {_duration(eta)}{note}",
            flush=True,
        )
        self._record({"step": step, **values})

    def event(self, step: int, name: str, **fields) -> None:
        """Rank 0: a line such as ``{"step": 10, "event": "resumed"}`` (plus ``fields``) in metrics.jsonl."""
        if self.rank == 0:
            self._record({"step": step, "event": name, **fields})

    def evaluation(self, step: int, result, dataset) -> None:
        """Rank 0: metrics table, history, predictions PNG and curves PNG."""
        if self.rank != 0:
            return
        from engine.coco_eval import format_metrics_table
        from engine.per_class import format_table, thresholds
        from engine.visualize import denormalize, draw_detections, grid, plot_curves

        per_class = f"\n{format_table(result.classes)}" if result.classes else ""
        print(
            f"evaluation at step {step} on {result.num_images} images\n{format_metrics_table(result.metrics)}"
            f"{per_class}",
            flush=True,
        )
        self._record({"step": step, **result.metrics})
        if result.classes:
            (self.log_dir / "thresholds.json").write_text(json.dumps(thresholds(result.classes), indent=1))
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

    def files(self) -> tuple[Path, ...]:
        """The progress files a checkpoint carries a copy of, so that they reach the run's storage."""
        paths = (self.log_dir / "metrics.jsonl", self.log_dir / "curves.png", self.predictions_png,
                 self.log_dir / "thresholds.json")  # fmt: skip
        return tuple(p for p in paths if p is not None and p.exists())

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

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
