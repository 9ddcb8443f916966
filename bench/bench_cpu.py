"""CPU benchmark: our RetinaNet (``model/``) against torchvision's, same weights, same inputs.

Measures, each as median and IQR over repetitions (``time.perf_counter``, after warm-up):

1. loss: batch 4, 20 random boxes per image, 512x512, 91 classes, from the same random head outputs
   (ours ``loss_fn(outputs, targets)``, torchvision ``compute_loss(targets, head_outputs, anchors)``);
   forward only, and forward + backward.
2. postprocess: same head outputs; ours ``postprocess``, torchvision ``postprocess_detections`` (per-level split).
3. training step: R50-FPN, 512x512, batch 2, 20 boxes per image: forward + loss + backward + SGD step.
   torchvision runs end to end (``model(images, targets)``) with its transform made an identity
   (min_size = max_size = image size, mean 0, std 1; checked). Each variant, on a copy of the same weights,
   is timed round-robin in a pair with torchvision as shipped (NCHW): ours NCHW, ours channels_last,
   torchvision channels_last, and with ``--compile`` ours channels_last through ``torch.compile``
   (inductor, C++). The headline row is our best pair. ``--bf16``: bfloat16 autocast on both sides.
   Then the hardware limit: the convolution share of one profiled step of each, the convolutions' FLOP
   rate against that of one large 3x3 convolution, and the most any model with the same convolutions
   could gain.

Both are built with FrozenBatchNorm2d, 3 trainable backbone stages, P6 from P5 (torchvision v1); ours with
``torchvision_config("v1")`` (per-image loss normalisation, L1 box loss). Before timing, the losses are checked
equal (relative difference < 1e-4). Targets: loss >= 5x, postprocess >= 2x, training step >= 1.3x faster
(speed-up = torchvision median / ours median).

    python bench/bench_cpu.py [--compile] [--bf16] [--quick] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torchvision.models import resnet50
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNet as TVRetinaNet
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import build_retinanet, load_torchvision_state_dict, torchvision_config
from model.anchors import level_sizes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import check, random_targets, rel_diff, time_pair
from cpu_step import print_variants, step_benchmark

TARGETS = {"loss forward": 5.0, "loss forward+backward": 5.0, "postprocess": 2.0, "training step": 1.3}


def build_models(num_classes: int, image_size: int) -> tuple[torch.nn.Module, Callable, Callable, TVRetinaNet]:
    """Torchvision v1 RetinaNet (frozen BN, 3 trainable stages) and ours with its weights copied in."""
    body = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    tv_backbone = _resnet_fpn_extractor(body, 3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    tv = TVRetinaNet(
        tv_backbone,
        num_classes,
        min_size=image_size,
        max_size=image_size,
        image_mean=[0.0] * 3,
        image_std=[1.0] * 3,
        detections_per_img=100,
    )  # our cap is 100, torchvision's default 300
    net, loss_fn, post = build_retinanet(torchvision_config("v1", num_classes=num_classes, backbone_norm="frozen_bn"))
    load_torchvision_state_dict(net, tv.state_dict())
    return net, loss_fn, post, tv


def head_benchmarks(args: argparse.Namespace, net, loss_fn, post, tv, checks: dict) -> dict[str, dict]:
    """Loss (forward, forward+backward) and postprocess on shared random head outputs."""
    gen = torch.Generator().manual_seed(0)
    n, s, k = args.batch, args.size, args.num_classes
    anchors, per_level = net.anchor_generator((s, s), level_sizes((s, s)), torch.device("cpu"), torch.float32)
    dummy = [torch.empty(n, 0, h, w) for h, w in level_sizes((s, s))]  # torchvision reads only shapes
    tv_anchors = tv.anchor_generator(ImageList(torch.empty(n, 3, s, s), [(s, s)] * n), dummy)
    check("anchors", float((tv_anchors[0] - anchors).abs().max()), checks, tol=1e-6, kind="max abs diff")
    a = anchors.shape[0]
    logits = (torch.randn(n, a, k, generator=gen) * args.logit_std + args.logit_mean).requires_grad_()
    deltas = (torch.randn(n, a, 4, generator=gen) * 0.5).requires_grad_()
    targets = random_targets(n, args.num_boxes, s, k, gen)
    ours_out = {
        "cls_logits": logits,
        "bbox_deltas": deltas,
        "anchors": anchors,
        "num_anchors_per_level": per_level,
        "image_size": (s, s),
    }
    tv_out = {"cls_logits": logits, "bbox_regression": deltas}

    def ours_loss() -> torch.Tensor:
        return loss_fn(ours_out, targets)["loss"]

    def tv_loss() -> torch.Tensor:
        d = tv.compute_loss(targets, tv_out, tv_anchors)
        return d["classification"] + d["bbox_regression"]

    ours_parts, tv_parts = loss_fn(ours_out, targets), tv.compute_loss(targets, tv_out, tv_anchors)
    check("loss cls (head outputs)", rel_diff(ours_parts["loss_cls"], tv_parts["classification"]), checks)
    check("loss box (head outputs)", rel_diff(ours_parts["loss_box"], tv_parts["bbox_regression"]), checks)

    def backward(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            logits.grad = deltas.grad = None
            fn().backward()

        return run

    sizes = [(s, s)] * n
    tv_split = {key: list(v.detach().split(per_level, dim=1)) for key, v in tv_out.items()}
    tv_split_anchors = [list(x.split(per_level)) for x in tv_anchors]
    ours_det = {**ours_out, "cls_logits": logits.detach(), "bbox_deltas": deltas.detach()}
    frac = float((torch.sigmoid(logits.detach()) > 0.05).float().mean())
    print(f"postprocess input: logits ~ N({args.logit_mean}, {args.logit_std}^2): {frac:.1%} of scores > 0.05")
    d_tv, d_ours = tv.postprocess_detections(tv_split, tv_split_anchors, sizes), post(ours_det, sizes)
    counts = [[len(d["scores"]) for d in dets] for dets in (d_tv, d_ours)]
    print(f"detections per image: torchvision {counts[0]}, ours {counts[1]}")
    check(
        "top detection scores",
        max(rel_diff(x["scores"][:10].sum(), y["scores"][:10].sum()) for x, y in zip(d_ours, d_tv, strict=True)),
        checks,
    )

    w, r = args.warmup, args.reps
    with torch.no_grad():
        res = {"loss forward": time_pair(tv_loss, ours_loss, w, r)}
    res["loss forward+backward"] = time_pair(backward(tv_loss), backward(ours_loss), w, r)
    res["postprocess"] = time_pair(
        lambda: tv.postprocess_detections(tv_split, tv_split_anchors, sizes), lambda: post(ours_det, sizes), w, r
    )
    return res


def print_table(results: dict[str, dict[str, float]]) -> None:
    print("\n| measurement | torchvision ms (IQR) | ours ms (IQR) | speed-up | target |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        ok = "met" if r["speedup"] >= TARGETS[name] else "MISSED"
        label = f"{name} ({r['ours_variant']})" if "ours_variant" in r else name
        print(
            f"| {label} | {r['tv_median_ms']:.1f} ({r['tv_iqr_ms']:.1f}) | {r['ours_median_ms']:.1f} "
            f"({r['ours_iqr_ms']:.1f}) | {r['speedup']:.2f}x | >= {TARGETS[name]}x {ok} |"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=512, help="square image side, a multiple of 128")
    p.add_argument("--batch", type=int, default=4, help="batch of the loss / postprocess measurements")
    p.add_argument("--step-batch", type=int, default=2, help="batch of the training step")
    p.add_argument("--num-boxes", type=int, default=20)
    p.add_argument("--num-classes", type=int, default=91)
    p.add_argument("--logit-mean", type=float, default=-2.5, help="random cls logits ~ N(mean, std^2)")
    p.add_argument("--logit-std", type=float, default=1.5)
    p.add_argument("--reps", type=int, default=20, help="repetitions of loss / postprocess")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--step-reps", type=int, default=5, help="repetitions of the training step")
    p.add_argument("--step-warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--skip-step", action="store_true", help="skip the training-step measurement")
    p.add_argument("--no-channels-last", action="store_true", help="training step: skip the channels_last variants")
    p.add_argument("--compile", action="store_true", help="training step: also ours channels_last + torch.compile")
    p.add_argument("--bf16", action="store_true", help="training step: bfloat16 autocast on both sides")
    p.add_argument("--quick", action="store_true", help="smoke run: 256 px, 3 reps, 1 warm-up")
    p.add_argument("--json", type=Path, default=None, help="also write the results here as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.reps, args.warmup, args.step_reps, args.step_warmup = 256, 3, 1, 2, 1
    if args.size % 128:
        p.error(f"--size must be a multiple of 128, got {args.size}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    precision = "bfloat16 autocast" if args.bf16 else "float32"
    print(f"torch {torch.__version__}, torch.set_num_threads({args.threads}), CPU, training step in {precision}")
    print(f"config: {vars(args)}")
    # Timings on a shared machine are meaningless: other busy processes make 2-thread OpenMP ops stall.
    print(f"load average at start (1, 5, 15 min): {os.getloadavg()} (should be well below {args.threads})")
    t0 = time.perf_counter()
    net, loss_fn, post, tv = build_models(args.num_classes, args.size)
    checks: dict[str, float] = {}
    results = head_benchmarks(args, net, loss_fn, post, tv, checks)
    variants = {}
    if not args.skip_step:
        print("training step: torchvision end to end, model(list_of_images, targets), identity transform")
        variants = step_benchmark(args, net, loss_fn, tv, checks)
        ours = [k for k in variants if k.startswith("ours")]
        best = max(ours, key=lambda k: variants[k]["vs_torchvision"])
        r = variants[best]
        results["training step"] = {
            "tv_median_ms": r["tv_median_ms"], "tv_iqr_ms": r["tv_iqr_ms"],
            "ours_median_ms": r["median_ms"], "ours_iqr_ms": r["iqr_ms"],
            "speedup": r["vs_torchvision"], "ours_variant": best,
        }  # fmt: skip
    print_table(results)
    if variants:
        print_variants(variants)
    wall = time.perf_counter() - t0
    print(f"\ntotal wall time {wall:.0f} s; load average at end: {os.getloadavg()} (includes this run)")
    if args.json is not None:
        payload = {
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "torch": torch.__version__,
            "checks": checks,
            "results": results,
            "training_step_variants": variants,
            "wall_s": wall,
        }
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
