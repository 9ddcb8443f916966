"""Latency of the exported graph: onnxruntime (CPU) against PyTorch eager (CPU), side by side in one run.

For each model (the ``demo`` recipe's ResNet-18 FPN at its 384 x 384 export size, and the paper's R50-FPN
at 800 px, padded to 896 x 1408 to hold a 800 x 1333 resize) and batch sizes 1 and 4: the network
forward (images -> cls_logits, bbox_deltas; random weights: latency does not depend on them), both runtimes
timed round-robin after warm-up, median and IQR in ms, and the ratio PyTorch / onnxruntime. The outputs are
checked equal first (max abs diff < 1e-4 on the logits). The postprocess, the same Python for both, is
not timed.

    python bench/bench_export.py [--quick] [--threads N] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import check, time_many

MODELS = {"demo R18-FPN": ("demo", (384, 384)), "R50-FPN 800 px": ("coco_r50_1x", (896, 1408))}


def bench_model(name: str, recipe: str, size: tuple[int, int], batches: list[int], reps: int, checks: dict) -> list:
    import onnxruntime as ort

    from engine.export import ExportSpec, RawHead, export_onnx
    from engine.inference import Predictor
    from engine.recipes import get_recipe
    from model import build_retinanet

    cfg = get_recipe(recipe)
    torch.manual_seed(0)
    net, _, postprocess = build_retinanet(cfg.model)
    predictor = Predictor(cfg, net.eval(), postprocess, [], torch.device("cpu"), "random weights")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(predictor, path, ExportSpec(size, dynamic_batch=True))
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        head = RawHead(net.eval())
        for n in batches:
            images = torch.randn(n, 3, *size)
            feed = {"images": images.numpy()}
            with torch.no_grad():
                expected = head(images)[0]
            got = torch.from_numpy(session.run(["cls_logits"], feed)[0])
            check(f"{name} batch {n}", float((got - expected).abs().max()), checks, kind="max abs diff")

            def eager(images=images):
                with torch.no_grad():
                    head(images)

            t = time_many({"pytorch": eager, "onnxruntime": lambda feed=feed: session.run(None, feed)}, 1, reps)
            rows.append({"model": name, "size": list(size), "batch": n, **{f"{k}_{s}": v[s] for k, v in t.items()
                         for s in ("median_ms", "iqr_ms")}})  # fmt: skip
            rows[-1]["ratio"] = rows[-1]["pytorch_median_ms"] / rows[-1]["onnxruntime_median_ms"]
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the demo model only, at 128 x 128, batch 1, 2 reps")
    ap.add_argument("--threads", type=int, help="CPU threads for both runtimes (default: torch's)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {"demo R18-FPN": ("demo", (128, 128))} if args.quick else MODELS
    batches, reps = ([1], 2) if args.quick else ([1, 4], args.reps)
    checks: dict[str, float] = {}
    rows = [
        r for name, (recipe, size) in models.items() for r in bench_model(name, recipe, size, batches, reps, checks)
    ]
    print(f"\n{'model':<16} {'input':>11} {'batch':>5} {'PyTorch ms':>14} {'onnxruntime ms':>16} {'ratio':>6}")
    for r in rows:
        print(f"{r['model']:<16} {'x'.join(map(str, r['size'])):>11} {r['batch']:>5} "
              f"{r['pytorch_median_ms']:>8.1f} ±{r['pytorch_iqr_ms']:<5.1f} {r['onnxruntime_median_ms']:>9.1f} "
              f"±{r['onnxruntime_iqr_ms']:<5.1f} {r['ratio']:>5.2f}x")  # fmt: skip
    print(f"threads: {torch.get_num_threads()}; ratio = PyTorch eager / onnxruntime (above 1: onnxruntime faster)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "checks": checks, "threads": torch.get_num_threads()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
