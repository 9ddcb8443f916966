"""One rank's training state, built once per attempt: model, optimizer, data, resumed position, logs."""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from engine import checkpoint as ckpt
from engine import collectives
from engine.compiling import compile_or_eager
from engine.config import TrainConfig
from engine.faults import Faults
from engine.hooks import StepContext, schedule
from engine.progress import ProgressLog
from engine.publish import LogPublisher
from engine.step import train_step
from model import build_retinanet
from pipeline import storage
from pipeline.batch import Batch
from pipeline.loader import Dataset, DetectionLoader, open_dataset

# ``report(metrics, URI of the uploaded checkpoint or None, checkpoint name)``: ``ray.train.report`` in a worker
Report = Callable[[dict, str | None, str], None]


@dataclass(eq=False)
class Worker:
    """What the step and the hooks share. ``net`` is the unwrapped model (state dicts, evaluation); ``model``
    is what the step calls (``net``, compiled, DDP-wrapped, or both)."""

    cfg: TrainConfig
    rank: int
    world_size: int
    device: torch.device
    net: torch.nn.Module
    model: torch.nn.Module
    loss_fn: Callable
    postprocess: torch.nn.Module
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    loader: DetectionLoader
    batches: Iterator[Batch]
    val_ds: Dataset | None
    state: ckpt.TrainState
    log: ProgressLog
    publisher: LogPublisher
    report: Report
    run_uri: str
    amp: bool
    metrics: dict = field(default_factory=dict)  # the latest progress values (ProgressHook)
    last_checkpoint: str | None = None
    last_checkpoint_step: int = 0

    def train_one_step(self) -> StepContext:
        """Next batch, the scheduled lr (times the rollbacks' factor), ``train_step``; counts the step."""
        o = self.cfg.optim
        start = time.perf_counter()
        batch = next(self.batches).to(self.device)
        waited = time.perf_counter() - start
        lr = o.lr_at(self.state.step, self.cfg.data.loader.batch_size * self.world_size) * self.state.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        losses = train_step(self.model, self.loss_fn, self.optimizer, self.params, batch, amp=self.amp,
                            channels_last=o.channels_last, clip_grad_norm=o.clip_grad_norm or 0.0)  # fmt: skip
        self.state.step += 1
        flags = schedule(self.cfg, self.state.step, self.val_ds is not None)
        return StepContext(self.state.step, losses, lr, len(batch), waited, time.perf_counter() - start, **flags)


def setup_worker(
    cfg: TrainConfig,
    rank: int,
    world_size: int,
    local_rank: int,
    log_dir: Path,
    *,
    run_uri: str,
    report: Report,
    node_id: str = "",
    restored: ckpt.Restored | None = None,
    faults: Faults | None = None,
) -> Worker:
    storage.configure(window_s=cfg.data.storage_retry_s)
    device = _device(cfg, local_rank)
    torch.manual_seed(cfg.seed + rank)
    net, loss_fn, postprocess = build_retinanet(cfg.model)
    net.to(device)
    if cfg.optim.channels_last:
        net.to(memory_format=torch.channels_last)
    loss_fn.check_inputs = False  # the loader checked boxes and labels on the host: no sync per step
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = _optimizer(cfg, params)
    loader = DetectionLoader(open_dataset(cfg.data.train_uri), rank=rank, world_size=world_size, train=True,
                             cfg=cfg.data.loader, device_id=local_rank if cfg.scaling.use_gpu else None)  # fmt: skip
    state = ckpt.TrainState()
    started_from = None
    if restored is not None:
        net.load_state_dict(restored.weights)
        optimizer.load_state_dict(restored.state.optimizer)
        state = restored.state
    elif cfg.model.init_from:  # a resume wins over init_from
        started_from = _init_from(net, cfg, loader)
    relaid = loader.resume(state.data_positions)
    log = ProgressLog(cfg, rank, log_dir, history=state.history, start_step=state.step)
    w = Worker(
        cfg, rank, world_size, device, net, net, loss_fn, postprocess, optimizer, params, loader, iter(loader),
        open_dataset(cfg.data.val_uri) if cfg.data.val_uri else None, state, log,
        LogPublisher(log_dir, run_uri, rank), report, run_uri, cfg.optim.amp and cfg.scaling.use_gpu,
    )  # fmt: skip
    if restored is not None:
        w.last_checkpoint, w.last_checkpoint_step = restored.uri, state.step
        if rank == 0:
            print(f"resumed from step {state.step} ({restored.uri})", flush=True)
        log.event(state.step, "resumed", checkpoint=restored.uri)
    if started_from is not None:
        report, what = started_from
        if rank == 0:
            print(f"initialised from {what}: {report.describe()}", flush=True)
        log.event(0, "init_from", source=what, loaded=report.loaded, fresh=report.fresh, ignored=report.ignored,
                  mapped_classes=report.mapped_classes)  # fmt: skip
    _announce_workers(w, node_id, relaid)
    _wrap(w, local_rank)
    if faults is not None:
        w.loss_fn = faults.wrap_loss(w.loss_fn, lambda: w.state.step)
        w.batches = faults.wrap_batches(w.batches, rank, lambda: w.state.step)
    return w


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.scaling.use_gpu:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        return device
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))  # workers share the machine's cores
    return torch.device("cpu")


def _optimizer(cfg: TrainConfig, params: list) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=o.base_lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.base_lr, momentum=o.momentum, weight_decay=o.weight_decay)


def _wrap(w: Worker, local_rank: int) -> None:
    """``optim.compile`` (tried on the first batch, eager if it fails) and DDP; compiled around DDP, so that
    its graph is split at the gradient buckets (overlap)."""
    o, compiled = w.cfg.optim, None
    if o.compile and w.state.step < o.max_iters:
        first = next(w.batches)
        w.batches = itertools.chain([first], w.batches)
        compiled = compile_or_eager(w.net, w.loss_fn, first.to(w.device), w.amp, o.channels_last, w.log,
                                    w.state.step, w.rank, mode=o.compile_mode)  # fmt: skip
    w.model = w.net if compiled is None else compiled
    if w.world_size > 1:
        gpu = w.cfg.scaling.use_gpu
        ddp = DistributedDataParallel(w.net, device_ids=[local_rank] if gpu else None, gradient_as_bucket_view=True,
                                      bucket_cap_mb=o.ddp_bucket_mb)  # fmt: skip
        w.model = torch.compile(ddp, mode=o.compile_mode) if compiled is not None else ddp


def _announce_workers(w: Worker, node_id: str, relaid: bool) -> None:
    """Rank 0 prints and records (event ``workers`` in metrics.jsonl) where each rank runs and which shards
    it reads this epoch: after a restart on fewer or other nodes, the log shows the new layout (and the event
    ``relayout`` says the data position was carried over to it)."""
    mine = {"rank": w.rank, "node": node_id, "host": socket.gethostname(), "shards": w.loader.assigned_shards()}
    ranks = collectives.gather_objects(mine)
    if w.rank != 0:
        return
    counts = sorted(len(r["shards"]) for r in ranks)
    nodes = len({r["node"] for r in ranks})
    print(f"{w.world_size} ranks on {nodes} node(s), {counts[0]}-{counts[-1]} shards each this epoch", flush=True)
    if relaid:
        saved = w.state.data_positions[0]
        before = {"world_size": saved["world_size"], "workers": saved["workers"]}
        after = {"world_size": w.world_size, "workers": w.cfg.data.loader.num_workers}
        epoch = w.loader.state_dict()["streams"][0]["epoch"]
        print(f"data position carried over from {before} to {after}: all ranks resume epoch {epoch}", flush=True)
        w.log.event(w.state.step, "relayout", before=before, after=after, epoch=epoch)
    w.log.event(w.state.step, "workers", world_size=w.world_size, ranks=ranks)


def _init_from(net, cfg: TrainConfig, loader: DetectionLoader):
    from engine.init_from import init_from

    names = [c["name"] for c in sorted(loader.dataset.manifest["categories"], key=lambda c: c["label"])]
    return init_from(net, cfg.model.init_from, names, by_name=cfg.model.init_class_map == "by_name")
