"""The per-worker training function that Ray Train runs on every rank.

Ray is read once here (rank, world size, local rank, checkpoint) and handed down as plain values.
The step itself is short; logging, evaluation and checkpoints are hooks at step boundaries.
"""

from __future__ import annotations

import itertools
import socket
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import ray
import ray.train
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from engine import checkpoint as ckpt
from engine.compiling import compile_or_eager
from engine.config import TrainConfig, from_dict, to_dict
from engine.evaluate import evaluate
from engine.progress import ProgressLog
from engine.step import train_step
from model import build_retinanet
from pipeline.loader import DetectionLoader, open_dataset


def train_loop_per_worker(config: dict) -> None:
    """Entry point for ``TorchTrainer``: ``config = {"cfg": to_dict(TrainConfig), "log_dir": str}``."""
    ctx = ray.train.get_context()
    cfg = from_dict(config["cfg"])
    run_worker(cfg, ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank(), Path(config["log_dir"]))


def run_worker(cfg: TrainConfig, rank: int, world_size: int, local_rank: int, log_dir: Path) -> None:
    gpu = cfg.scaling.use_gpu
    device = torch.device("cuda", local_rank) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    else:  # workers share the machine's cores
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.seed + rank)
    net, loss_fn, postprocess = build_retinanet(cfg.model)
    net.to(device)
    if cfg.optim.channels_last:
        net.to(memory_format=torch.channels_last)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = _optimizer(cfg, params)

    train_ds = open_dataset(cfg.data.train_uri)
    val_ds = open_dataset(cfg.data.val_uri) if cfg.data.val_uri else None
    loader = DetectionLoader(
        train_ds,
        rank=rank,
        world_size=world_size,
        train=True,
        cfg=cfg.data.loader,
        device_id=local_rank if gpu else None,
    )
    state = ckpt.TrainState()
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            state, _ = ckpt.load(Path(directory), net)
        optimizer.load_state_dict(state.optimizer)
        if rank < len(state.data_positions):
            loader.load_state_dict(state.data_positions[rank])
    log = ProgressLog(cfg, rank, world_size, log_dir, history=state.history, start_step=state.step)
    if rank == 0 and restored is not None:
        print(f"resumed from step {state.step}", flush=True)
        log.event(state.step, "resumed")
    _announce_workers(loader, log, rank, world_size, state.step)

    global_batch = cfg.data.loader.batch_size * world_size
    batches = iter(loader)
    amp = cfg.optim.amp and gpu
    o = cfg.optim
    loss_fn.check_inputs = False  # the loader checked boxes and labels on the host: no sync per step
    compiled = None
    if o.compile and state.step < o.max_iters:
        first = next(batches)
        batches = itertools.chain([first], batches)
        compiled = compile_or_eager(net, loss_fn, first.to(device), amp, o.channels_last, log, state.step, rank,
                                    mode=o.compile_mode)  # fmt: skip
    model = net if compiled is None else compiled
    if world_size > 1:  # compiled around DDP, so that its graph is split at the gradient buckets (overlap)
        model = DistributedDataParallel(
            net, device_ids=[local_rank] if gpu else None, gradient_as_bucket_view=True, bucket_cap_mb=o.ddp_bucket_mb
        )
        model = torch.compile(model, mode=o.compile_mode) if compiled is not None else model
    for step in range(state.step, o.max_iters):
        start = time.perf_counter()
        batch = next(batches).to(device)
        waited = time.perf_counter() - start
        lr = o.lr_at(step, global_batch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        losses = train_step(model, loss_fn, optimizer, params, batch, amp=amp, channels_last=o.channels_last,
                            clip_grad_norm=o.clip_grad_norm or 0.0)  # fmt: skip
        done = step + 1
        log.step(losses, lr, len(batch), waited, time.perf_counter() - start)
        if done % cfg.log.every == 0 or done == cfg.optim.max_iters:
            log.flush(done)
        last = done == cfg.optim.max_iters
        eval_due = val_ds is not None and (
            (cfg.eval.every and done % cfg.eval.every == 0) or (last and cfg.eval.at_end)
        )
        if eval_due or last or done % cfg.checkpoint.every == 0:
            metrics = dict(log.latest(), step=done)
            if eval_due:
                _sync_buffers(net, world_size)
                result = evaluate(
                    net, postprocess, val_ds, rank=rank, world_size=world_size,
                    loader_cfg=_eval_loader_cfg(cfg), device=device, max_images=cfg.eval.max_images, amp=amp,
                    num_samples=cfg.eval.num_vis_images,
                )  # fmt: skip
                if result.metrics is not None:
                    metrics.update(result.metrics)
                    log.evaluation(done, result, val_ds)
            state.step = done
            _report(cfg, net, optimizer, loader, state, metrics, log, rank, world_size)
    log.close()


def _announce_workers(loader: DetectionLoader, log: ProgressLog, rank: int, world_size: int, step: int) -> None:
    """Rank 0 prints and records (event ``workers`` in metrics.jsonl) where each rank runs and which shards
    it reads this epoch: after a restart on fewer or other nodes, the log shows the new layout."""
    mine = {
        "rank": rank,
        "node": ray.get_runtime_context().get_node_id(),
        "host": socket.gethostname(),
        "shards": loader.assigned_shards(),
    }
    ranks: list = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(ranks, mine)
    else:
        ranks = [mine]
    if rank == 0:
        counts = sorted(len(r["shards"]) for r in ranks)
        nodes = len({r["node"] for r in ranks})
        print(f"{world_size} ranks on {nodes} node(s), {counts[0]}-{counts[-1]} shards each this epoch", flush=True)
        log.event(step, "workers", world_size=world_size, ranks=ranks)


def _report(cfg, net, optimizer, loader, state, metrics, log, rank, world_size) -> None:
    """Every rank calls ``ray.train.report`` (a barrier); rank 0 attaches the checkpoint."""
    positions: list = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(positions, loader.state_dict())
    else:
        positions = [loader.state_dict()]
    if rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=ckpt.checkpoint_name(state.step))
        return
    state.optimizer = optimizer.state_dict()
    state.data_positions = positions
    state.history = log.history
    if "AP" in metrics and metrics["AP"] > state.best_ap:
        state.best_ap = metrics["AP"]
        metrics["best"] = True
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        ckpt.save(directory, net, state, to_dict(cfg), metrics, loader.dataset.manifest["categories"])
        log.copy_artifacts(directory)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
            checkpoint_dir_name=ckpt.checkpoint_name(state.step),
        )
    if metrics.get("best"):
        log.save_best(net, metrics)
    log.publish()


def _sync_buffers(net: torch.nn.Module, world_size: int) -> None:
    """Rank 0's BatchNorm statistics everywhere: DDP syncs buffers only at the start of a forward, so
    after the last step each rank holds its own. Evaluation and the checkpoint must see the same."""
    if world_size > 1:
        for buffer in net.buffers():
            dist.broadcast(buffer, src=0)


def _optimizer(cfg: TrainConfig, params: list) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=o.base_lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.base_lr, momentum=o.momentum, weight_decay=o.weight_decay)


def _eval_loader_cfg(cfg: TrainConfig):
    return replace(cfg.data.loader, batch_size=cfg.data.eval_batch_size)
