"""Training step of ``bench_cpu.py``: R50-FPN forward + loss + backward + SGD step, torchvision as shipped
against each variant, and the hardware limit of that comparison on this machine.

Each variant is timed in its own round-robin pair with torchvision as shipped, with only those two models
alive: timing five models in one round-robin made torchvision's step 15-35% slower and its IQR ten
times wider than in a pair, which inflated every ratio.
"""

from __future__ import annotations

import argparse
import copy
import gc
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import Targets, check, random_targets, rel_diff, time_many, time_pair

CONV_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::slow_conv2d", "aten::thnn_conv2d")


def step_benchmark(args: argparse.Namespace, net, loss_fn, tv, checks: dict) -> dict[str, dict[str, float]]:
    """Per variant: medians and IQRs (ms) of torchvision as shipped and of the variant, timed as a pair,
    and ``vs_torchvision`` = torchvision median / variant median. Adds ``hardware limit`` (see below)."""
    gen = torch.Generator().manual_seed(1)
    n, s = args.step_batch, args.size
    images = torch.rand(n, 3, s, s, generator=gen)
    targets = random_targets(n, args.num_boxes, s, args.num_classes, gen)
    net.train(), tv.train()
    with torch.no_grad():
        tv_images, _ = tv.transform(list(images), [dict(t) for t in targets])
    assert tuple(tv_images.tensors.shape) == (n, 3, s, s), f"torchvision transform resized to {tv_images.tensors.shape}"
    check(
        "torchvision transform is identity",
        float((tv_images.tensors - images).abs().max()),
        checks,
        1e-5,
        "max abs diff",
    )
    n_ours = sum(p.numel() for p in net.parameters() if p.requires_grad)
    n_tv = sum(p.numel() for p in tv.parameters() if p.requires_grad)
    print(f"trainable parameters: torchvision {n_tv:,}, ours {n_ours:,}")
    assert n_ours == n_tv, "trainable parameter counts differ"
    with torch.no_grad():
        tv_loss = sum(tv(list(images), targets).values())
        ours_loss = loss_fn(net(images), targets)["loss"]
    check("loss (full model)", rel_diff(ours_loss, tv_loss), checks)

    tv_step = _tv_step(tv, images, targets, args.bf16)
    variants: list[tuple[str, bool, bool]] = [("ours", False, False)]
    if not args.no_channels_last:
        variants += [("ours channels_last", True, False), ("torchvision channels_last", True, False)]
    if args.compile:
        variants.append(("ours channels_last + compile", True, True))
    out: dict[str, dict[str, float]] = {}
    for name, cl, compiled in variants:
        fmt = torch.channels_last if cl else torch.contiguous_format
        model = copy.deepcopy(tv if name.startswith("torchvision") else net).to(memory_format=fmt)
        x = images.contiguous(memory_format=fmt)
        if name.startswith("torchvision"):
            step = _tv_step(model, x, targets, args.bf16)
        else:
            step = _our_step(torch.compile(model) if compiled else model, loss_fn, x, targets, args.bf16)
        if compiled:
            t0 = time.perf_counter()
            step()
            print(f"{name}: first step (compiling) {time.perf_counter() - t0:.0f} s")
        r = time_pair(tv_step, step, args.step_warmup, args.step_reps)
        out[name] = {
            "tv_median_ms": r["tv_median_ms"], "tv_iqr_ms": r["tv_iqr_ms"],
            "median_ms": r["ours_median_ms"], "iqr_ms": r["ours_iqr_ms"], "vs_torchvision": r["speedup"],
        }  # fmt: skip
        if name == "ours":
            out["hardware limit"] = hardware_limit(tv_step, step, args.bf16)
        del model, step
        gc.collect()
    return out


def hardware_limit(tv_step: Callable[[], None], our_step: Callable[[], None], bf16: bool) -> dict[str, float]:
    """How fast ours could be at best: both models run the same convolutions (same shapes, same kernels),
    so with every other op free ours takes torchvision's convolution time. Profiles one step of each
    (self CPU time of the convolution kernels, forward and backward), counts the convolution FLOPs with
    ``torch.utils.flop_counter`` and compares their rate with that of one large, well-shaped convolution
    (3x3, 256 -> 256 channels, 64x64, batch 2, forward), the best this machine's convolution kernels do.
    (A matmul is no reference here: on AMD CPUs MKL's GEMM runs at well under oneDNN's convolution rate.)"""
    tv_total, tv_conv = _conv_time(tv_step)
    ours_total, ours_conv = _conv_time(our_step)
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        our_step()
    conv_flops = sum(v for k, v in counter.get_flop_counts()["Global"].items() if "convolution" in str(k))
    dtype = torch.bfloat16 if bf16 else torch.float32
    x, w = torch.randn(2, 256, 64, 64, dtype=dtype), torch.randn(256, 256, 3, 3, dtype=dtype)
    with torch.no_grad():
        ref_ms = time_many({"conv": lambda: F.conv2d(x, w, padding=1)}, 2, 10)["conv"]["median_ms"]
    ref_flops = 2 * 2 * 256 * 64 * 64 * 256 * 9
    return {
        "tv_step_ms": tv_total, "tv_conv_ms": tv_conv, "ours_step_ms": ours_total, "ours_conv_ms": ours_conv,
        "conv_gflop": conv_flops / 1e9, "conv_gflops": conv_flops / ours_conv / 1e6,
        "ref_conv_gflops": ref_flops / ref_ms / 1e6, "max_speedup": tv_total / tv_conv,
    }  # fmt: skip


def _conv_time(step: Callable[[], None], steps: int = 2) -> tuple[float, float]:
    """(step ms, convolution ms), means over ``steps`` profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e3 / steps
    return total, sum(e.self_cpu_time_total for e in events if e.key in CONV_OPS) / 1e3 / steps


def print_variants(variants: dict[str, dict[str, float]]) -> None:
    print("\n| training step variant | torchvision ms (IQR) | variant ms (IQR) | vs torchvision |")
    print("|---|---|---|---|")
    for name, r in variants.items():
        if name != "hardware limit":
            print(
                f"| {name} | {r['tv_median_ms']:.1f} ({r['tv_iqr_ms']:.1f}) | {r['median_ms']:.1f} ({r['iqr_ms']:.1f}) "
                f"| {r['vs_torchvision']:.2f}x |"
            )
    if "hardware limit" in variants:
        h = variants["hardware limit"]
        print(
            f"\nhardware limit (one profiled step each): torchvision {h['tv_step_ms']:.0f} ms, of which convolutions "
            f"{h['tv_conv_ms']:.0f} ms ({h['tv_conv_ms'] / h['tv_step_ms']:.0%}); ours {h['ours_step_ms']:.0f} ms, "
            f"convolutions {h['ours_conv_ms']:.0f} ms ({h['ours_conv_ms'] / h['ours_step_ms']:.0%}).\n"
            f"The convolutions ({h['conv_gflop']:.0f} GFLOP) run at {h['conv_gflops']:.0f} GFLOP/s, "
            f"{h['conv_gflops'] / h['ref_conv_gflops']:.0%} of one large 3x3 convolution's rate on this machine "
            f"({h['ref_conv_gflops']:.0f} GFLOP/s).\nBoth models run the same convolutions, so with every other op "
            f"free ours could be at most {h['max_speedup']:.2f}x torchvision's step."
        )


def _tv_step(tv, images: torch.Tensor, targets: Targets, bf16: bool) -> Callable[[], None]:
    """torchvision end to end: ``model(list_of_images, targets)`` (its transform batches the list)."""
    opt = _sgd(tv)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = sum(tv(list(images), targets).values())
        loss.backward()
        opt.step()

    return step


def _our_step(forward, loss_fn, images: torch.Tensor, targets: Targets, bf16: bool) -> Callable[[], None]:
    opt = _sgd(forward)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(forward(images), targets)["loss"]
        loss.backward()
        opt.step()

    return step


def _sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
