"""Export a checkpoint to ONNX and check that it lost nothing.

    python jobs/export.py --checkpoint runs/demo/best --format onnx --data data/demo/val --out export/
        [--opset 18] [--dynamic-batch] [--image-size H W] [--max-images N]
    python jobs/export.py --checkpoint runs/demo/best --data OTHER_VAL --out export/ --check   # checks again

Writes ``OUT/model.onnx`` (images ``[N, 3, H, W]`` normalised and zero-padded -> ``cls_logits``,
``bbox_deltas``) and ``OUT/export.json`` (config, categories, thresholds, the input contract and the
checks). The decode and per-class NMS stay in Python (``engine.export.onnx_detections``): see
``engine/export.py`` for the split. With ``--data`` both checks run: raw outputs of onnxruntime against
PyTorch (max abs difference, target < 1e-4) and the COCO AP of their detections (difference, target
<= 0.001); ``--check`` runs them again on the exported model with any data set. A TensorRT engine:
``trtexec --onnx=OUT/model.onnx --fp16 --saveEngine=model.plan`` (add ``--minShapes/--optShapes/--maxShapes``
for ``images`` with ``--dynamic-batch``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import _bootstrap  # noqa: F401


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a checkpoint folder, a run's best/ or a run; local or s3://")
    ap.add_argument("--format", choices=["onnx"], default="onnx")
    ap.add_argument("--out", type=Path, required=True, help="folder for model.onnx and export.json")
    ap.add_argument("--data", help="a converted validation set for the checks (folder or s3://)")
    ap.add_argument("--opset", type=int, default=18)
    ap.add_argument("--dynamic-batch", action="store_true", help="a batch dimension of any size (default: 1)")
    ap.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                    help="padded input size, multiples of 128 (default: a square for every eval resize)")  # fmt: skip
    ap.add_argument("--max-images", type=int, help="check on at most this many images")
    ap.add_argument("--check", action="store_true", help="only check the model.onnx already in --out on --data")
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    from engine.export import ExportSpec, default_image_size, export_onnx, write_manifest
    from engine.export_check import check
    from engine.inference import load_predictor
    from pipeline.loader import open_dataset

    if args.check and not args.data:
        raise ValueError("--check needs --data: the data set to check the exported model on")
    with tempfile.TemporaryDirectory() as tmp:
        predictor = load_predictor(args.checkpoint, Path(tmp), "cpu")
    onnx_path, manifest_path = args.out / "model.onnx", args.out / "export.json"
    if args.check:
        if not manifest_path.exists() or not onnx_path.exists():
            raise ValueError(f"no model.onnx and export.json in {args.out}: export there first (without --check)")
        saved = json.loads(manifest_path.read_text())
        shape = saved["input"]["shape"]
        spec = ExportSpec((shape[2], shape[3]), saved["opset"], shape[0] == "batch")
    else:
        spec = ExportSpec(tuple(args.image_size or default_image_size(predictor.cfg)), args.opset, args.dynamic_batch)
    dataset = open_dataset(args.data) if args.data else None
    if dataset is not None and dataset.num_classes != predictor.cfg.model.num_classes:
        raise ValueError(f"{args.data} has {dataset.num_classes} classes, the checkpoint's model "
                         f"{predictor.cfg.model.num_classes}: check on the data it was trained for")  # fmt: skip
    if not args.check:
        args.out.mkdir(parents=True, exist_ok=True)
        export_onnx(predictor, onnx_path, spec)
    checks = check(predictor, onnx_path, spec, dataset, args.max_images) if dataset is not None else None
    return write_manifest(manifest_path, predictor, spec, checks)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipeline.storage import StorageError

    try:
        manifest = run(args)
    except (ValueError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shape = manifest["input"]["shape"]
    print(f"wrote {args.out / 'model.onnx'} (images {shape}, opset {manifest['opset']}) and {args.out / 'export.json'}")
    c = manifest["checks"]
    if c is None:
        print("not checked: add --data VAL to compare onnxruntime with PyTorch")
        return 0
    print(f"check on {c['images']} images of {c['data']}: raw outputs max |diff| {c['raw_max_abs_diff']:.2e} "
          f"(target < {c['raw_target']:g}); AP PyTorch {c['ap_pytorch']:.4f}, onnxruntime {c['ap_onnx']:.4f}, "
          f"diff {c['ap_diff']:.4f} (target <= {c['ap_target']:g})")  # fmt: skip
    if not c["passed"]:
        print("error: the exported model differs from the checkpoint beyond the targets", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
