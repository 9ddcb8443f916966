"""GPU training-step benchmark: our RetinaNet against torchvision's, same GPU, same weights, same batch.

Needs only torch and torchvision (the lent GPU machine has no Ray or DALI). R50-FPN, 91 classes,
images padded to a multiple of 128 (800x1333 -> 896x1408 by default), synthetic batches with 20 boxes
per image. Before timing, both models compute the loss on the same weights and inputs (float32, no
TF32) and must agree to 1e-4. Each variant runs forward + loss + backward + SGD step; times are CUDA
events around single steps after warm-up, median over repetitions. MFU counts the step's FLOPs with
``torch.utils.flop_counter`` against the bf16 dense peak given by ``--peak-tflops``.

    python bench/bench_gpu.py                       # full size on a GPU
    python bench/bench_gpu.py --device cpu --quick  # smoke run on a CPU
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model
from tests.model.tv_reference import torchvision_retinanet


def synthetic_batch(n: int, h: int, w: int, device: str, seed: int = 0) -> tuple[torch.Tensor, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, h, w, generator=g)
    targets = []
    for _ in range(n):
        xy = torch.rand(20, 2, generator=g) * torch.tensor([w - 64.0, h - 64.0])
        wh = 16 + torch.rand(20, 2, generator=g) * 300
        boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([w, h]))], 1)
        targets.append({"boxes": boxes.to(device), "labels": torch.randint(0, 91, (20,), generator=g).to(device)})
    return images.to(device), targets


def tv_loss_fn(tv: torch.nn.Module) -> Callable:
    """torchvision's own training path without its resize transform: backbone, head, anchors, compute_loss."""
    from torchvision.models.detection.image_list import ImageList

    def step(images: torch.Tensor, targets: list[dict]) -> torch.Tensor:
        features = list(tv.backbone(images).values())
        head = tv.head(features)
        anchors = tv.anchor_generator(ImageList(images, [tuple(images.shape[-2:])] * len(images)), features)
        losses = tv.compute_loss(targets, head, anchors)
        return losses["classification"] + losses["bbox_regression"]

    return step


def ours_loss_fn(net: torch.nn.Module, loss_fn: torch.nn.Module) -> Callable:
    return lambda images, targets: loss_fn(net(images), targets)["loss"]


def ours_train_fn(net: torch.nn.Module, loss_fn: torch.nn.Module) -> Callable:
    """As the training loop runs it: the targets padded into one ``[N, M, 4]`` / ``[N, M]`` pair and no
    input check in the loss (the loader checks on the host), so the step never waits for the GPU."""
    unchecked = copy.copy(loss_fn)
    unchecked.check_inputs = False
    cached: list = [None, None]  # (targets, their padded form): stacked once, as the loader hands them over

    def step(images: torch.Tensor, targets: list[dict]) -> torch.Tensor:
        if cached[0] is not targets:
            cached[:] = [targets, padded(targets)]
        return unchecked(net(images), cached[1])["loss"]

    return step


def padded(targets: list[dict]) -> dict[str, torch.Tensor]:
    """Equal-length targets (the synthetic batches all have 20 boxes) stacked: free, no padding rows."""
    return {"boxes": torch.stack([t["boxes"] for t in targets]), "labels": torch.stack([t["labels"] for t in targets])}


def check_same_loss(tv, net, loss_fn, device: str, h: int, w: int) -> float:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    images, targets = synthetic_batch(2, h, w, device, seed=1)
    with torch.no_grad():
        a = tv_loss_fn(tv)(images, targets).item()
        b = ours_loss_fn(net, loss_fn)(images, targets).item()
        c = ours_train_fn(net, loss_fn)(images, targets).item()  # the loop's padded, unchecked form
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    rel = abs(a - b) / abs(a)
    print(f"same-weights loss check: torchvision {a:.6f}, ours {b:.6f}, relative difference {rel:.2e}")
    if rel > 1e-4 or abs(c - b) > 1e-6 * abs(b):
        raise SystemExit("losses differ: the comparison would not be fair")
    return rel


def time_steps(step: Callable, params: list, images, targets, amp: bool, warmup: int, reps: int) -> list[float]:
    """Milliseconds per training step (forward, loss, backward, SGD update)."""
    optim = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4)
    cuda = images.is_cuda
    times = []
    for i in range(warmup + reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            import time

            t0 = time.perf_counter()
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = step(images, targets)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        if cuda:
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            ms = (time.perf_counter() - t0) * 1000
        if i >= warmup:
            times.append(ms)
    return times


def step_flops(step: Callable, images, targets, amp: bool) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        step(images, targets).backward()
    return float(counter.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--height", type=int, default=896)
    ap.add_argument("--width", type=int, default=1408)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100 SXM datasheet: 989)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of our network")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode; reduce-overhead = CUDA graphs")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.quick:  # R50-FPN at 128 px still has every FPN level (P7 is 1x1); bf16 on a CPU is slow
        args.batch, args.height, args.width, args.warmup, args.reps = 1, 128, 128, 1, 1
    dev = args.device
    torch.manual_seed(0)
    tv = torchvision_retinanet("v1").to(dev).train()
    net, loss_fn, _ = model.build_retinanet(model.torchvision_config("v1"))
    model.load_torchvision_state_dict(net, tv.state_dict())
    net = net.to(dev).train()
    check_same_loss(tv, net, loss_fn, dev, *((128, 256) if args.quick else (256, 384)))

    images, targets = synthetic_batch(args.batch, args.height, args.width, dev)
    tv_params = [p for p in tv.parameters() if p.requires_grad]
    our_params = [p for p in net.parameters() if p.requires_grad]
    variants: list[tuple[str, Callable, list, bool, bool]] = [
        ("torchvision fp32", tv_loss_fn(tv), tv_params, False, False),
        ("torchvision bf16 autocast", tv_loss_fn(tv), tv_params, True, False),
        ("ours fp32", ours_train_fn(net, loss_fn), our_params, False, False),
        ("ours bf16 autocast", ours_train_fn(net, loss_fn), our_params, True, False),
        ("ours bf16 + channels_last", ours_train_fn(net, loss_fn), our_params, True, True),
    ]
    if args.compile:
        compiled = torch.compile(net, mode=args.compile_mode)
        compiled_step = ours_train_fn(compiled, loss_fn)
        variants.append((f"ours bf16 + channels_last + compile ({args.compile_mode})", compiled_step, our_params,
                         True, True))  # fmt: skip
    flops = step_flops(ours_train_fn(net, loss_fn), images, targets, True)
    device_name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"device {device_name}, torch {torch.__version__}, batch {args.batch} x {args.height}x{args.width}, ", end="")
    print(f"{flops / args.batch / 1e9:.0f} GFLOP per image per step")
    rows = []
    for name, step, params, amp, channels_last in variants:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        for module in (tv, net):
            module.to(memory_format=fmt)
        imgs = images.contiguous(memory_format=fmt)
        if dev == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            times = time_steps(step, params, imgs, targets, amp, args.warmup, args.reps)
        except Exception as e:  # e.g. compile unavailable: report and go on
            print(f"{name}: failed ({type(e).__name__}: {str(e)[:200]})")
            continue
        med = statistics.median(times)
        q = statistics.quantiles(times, n=4) if len(times) > 1 else [med, med, med]
        mem = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
        rows.append({"variant": name, "ms": med, "iqr_ms": q[2] - q[0], "img_s": args.batch / med * 1000,
                     "mfu": flops / (med / 1000) / (args.peak_tflops * 1e12), "peak_gib": mem})  # fmt: skip
    base = next((r["img_s"] for r in rows if r["variant"] == "torchvision bf16 autocast"), rows[0]["img_s"])
    print("\n| variant | ms/step (IQR) | img/s | vs torchvision bf16 | MFU | peak GiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        r["ratio"] = r["img_s"] / base
        print(f"| {r['variant']} | {r['ms']:.1f} ({r['iqr_ms']:.1f}) | {r['img_s']:.1f} | {r['ratio']:.2f}x "
              f"| {r['mfu']:.1%} | {r['peak_gib']:.1f} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
