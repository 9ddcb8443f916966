"""Static shapes: what fixed padding costs and what it saves, for eager and torch.compile'd training.

The loader's natural batches vary: the shorter side is drawn from the training sizes, images are
landscape or portrait, the padded size is the batch maximum rounded up to 128, and the box tensors
have as many rows as the fullest image. ``data.loader.aug.pad_to`` + ``data.loader.pad_boxes_to`` make
every batch one shape. This script feeds the same sequence of synthetic batches (torch only: it also
runs on the GPU machine, which has no DALI) to the training loop's own ``engine.step.train_step`` in
both layouts, eagerly and compiled, and prints per variant: graphs compiled (torch._dynamo's count),
wall time of the whole sequence (compiling included), median step time over the second half, and
the padded pixels per batch. No timing is asserted anywhere.

    python bench/bench_static.py                      # CPU: ResNet-18 FPN, 192-256 px, 16 steps
    python bench/bench_static.py --device cuda --backbone resnet50 --sizes 640,672,704,736,768,800 \\
        --max-size 1333 --pad-to 1408 --batch 8 --amp --compile-mode reduce-overhead
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.step import train_step
from model import RetinaNetConfig, build_retinanet
from pipeline.batch import Batch

DIVISOR = 128


def batches(args: argparse.Namespace, static: bool) -> list[Batch]:
    """The same random sequence for both layouts (seeded): only the padding differs."""
    rng = random.Random(0)
    out = []
    for _ in range(args.steps):
        sizes, counts = [], []
        for _ in range(args.batch):
            short = rng.choice(args.sizes)
            long = min(args.max_size, int(short * rng.uniform(1.2, 1.8)))
            sizes.append((short, long) if rng.random() < 0.7 else (long, short))  # mostly landscape
            counts.append(rng.randint(1, args.max_boxes))
        if static:
            h = w = args.pad_to
            m = max(args.pad_boxes_to, *counts)
        else:
            h = math.ceil(max(s[0] for s in sizes) / DIVISOR) * DIVISOR
            w = math.ceil(max(s[1] for s in sizes) / DIVISOR) * DIVISOR
            m = max(counts)
        g = torch.Generator().manual_seed(len(out))
        images = torch.zeros(args.batch, 3, h, w)
        boxes = torch.zeros(args.batch, m, 4)
        labels = torch.full((args.batch, m), -1)
        for i, ((ih, iw), n) in enumerate(zip(sizes, counts, strict=True)):
            images[i, :, :ih, :iw] = torch.randn(3, ih, iw, generator=g)
            xy = torch.rand(n, 2, generator=g) * torch.tensor([iw * 0.7, ih * 0.7])
            wh = 8 + torch.rand(n, 2, generator=g) * torch.tensor([iw * 0.3, ih * 0.3])
            boxes[i, :n] = torch.cat([xy, xy + wh], 1)
            labels[i, :n] = torch.randint(0, args.classes, (n,), generator=g)
        hw = torch.tensor(sizes)
        out.append(Batch(images=images, image_sizes=hw, original_sizes=hw, image_ids=torch.arange(args.batch),
                         boxes=boxes, labels=labels, num_boxes=torch.tensor(counts),
                         flipped=torch.zeros(args.batch, dtype=torch.bool)))  # fmt: skip
    return out


def run_variant(args: argparse.Namespace, data: list[Batch], compiled: bool) -> dict:
    import torch._dynamo
    import torch._inductor.config

    torch._dynamo.reset()
    torch._inductor.config.fx_graph_cache = False  # every variant compiles from scratch: no cache hits
    torch.manual_seed(0)
    cfg = RetinaNetConfig(num_classes=args.classes, backbone=args.backbone)
    net, loss_fn, _ = build_retinanet(cfg)
    net = net.to(args.device).to(memory_format=torch.channels_last)
    loss_fn.check_inputs = False
    model = torch.compile(net, mode=args.compile_mode) if compiled else net
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    times = []
    t_all = time.perf_counter()
    for batch in data:
        batch = batch.to(args.device)
        t0 = time.perf_counter()
        train_step(model, loss_fn, optimizer, params, batch, amp=args.amp, channels_last=True, clip_grad_norm=0.0)
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    total = time.perf_counter() - t_all
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
    return {"graphs": graphs, "total_s": total, "step_ms": statistics.median(times[len(times) // 2 :])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--sizes", default="192,224,256", help="shorter sides drawn per image")
    ap.add_argument("--max-size", type=int, default=384)
    ap.add_argument("--pad-to", type=int, default=384, help="static layout: every batch pad_to x pad_to")
    ap.add_argument("--pad-boxes-to", type=int, default=32)
    ap.add_argument("--max-boxes", type=int, default=24)
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--amp", action="store_true", help="bf16 autocast")
    ap.add_argument("--compile-mode", default="default")
    ap.add_argument("--no-compile", action="store_true", help="eager variants only")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for static in (False, True):
        data = batches(args, static)
        shapes = {(tuple(b.images.shape[-2:]), b.boxes.shape[1]) for b in data}
        pixels = statistics.mean(b.images.shape[-2] * b.images.shape[-1] for b in data) * args.batch
        for compiled in (False,) if args.no_compile else (False, True):
            how = f"compiled ({args.compile_mode})" if compiled else "eager"
            name = f"{'static' if static else 'natural'} {how}"
            r = run_variant(args, data, compiled)
            rows.append({"variant": name, "input_shapes": len(shapes), "pixels_per_batch": pixels, **r})
            print(f"{name}: {r}", flush=True)
    print(f"\n{args.steps} steps, batch {args.batch}, {args.backbone}, sizes {args.sizes}, device {args.device}")
    print("| variant | distinct input shapes | padded Mpixel/batch | graphs compiled | total s | step ms (2nd half) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['input_shapes']} | {r['pixels_per_batch'] / 1e6:.2f} | {r['graphs']} "
              f"| {r['total_s']:.1f} | {r['step_ms']:.0f} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
