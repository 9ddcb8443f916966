"""Quick-start demo: fit a small RetinaNet on a few real COCO images and print its detections.

Until the distributed training job lands (Ray Train + shards + DALI), this exercises the model end to
end on CPU: the paper's loss on real boxes, then postprocess, printed next to the ground truth.
With ``--weights FILE`` (torchvision's published ``retinanet_resnet50_fpn`` COCO weights, a local file)
it skips training and runs those weights instead.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _bootstrap
import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_iou

import model

DEFAULT_DATA = _bootstrap.ROOT.parent / "shared" / "data" / "coco128"
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def load_coco(data: Path, num_images: int, size: int) -> tuple[torch.Tensor, list[dict], list[dict], dict[int, str]]:
    """The first ``num_images`` images with boxes, resized so the longer side is ``size`` and padded to
    ``[N, 3, S, S]`` (S = size rounded up to 128); boxes scaled to match, labels contiguous 0..79."""
    coco = json.loads((data / "annotations" / "instances_train2017.json").read_text())
    cats = sorted(c["id"] for c in coco["categories"])
    label_of = {cid: i for i, cid in enumerate(cats)}
    names = {label_of[c["id"]]: c["name"] for c in coco["categories"]}
    by_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        if not ann.get("iscrowd", 0) and ann["bbox"][2] > 1 and ann["bbox"][3] > 1:
            by_image.setdefault(ann["image_id"], []).append(ann)
    chosen = [im for im in coco["images"] if im["id"] in by_image][:num_images]
    padded = -(-size // 128) * 128
    batch = torch.zeros(len(chosen), 3, padded, padded)
    targets, metas = [], []
    for i, im in enumerate(chosen):
        scale = size / max(im["width"], im["height"])
        h, w = round(im["height"] * scale), round(im["width"] * scale)
        rgb = Image.open(data / "images" / "train2017" / im["file_name"]).convert("RGB").resize((w, h), Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).float() / 255
        batch[i, :, :h, :w] = (pixels - MEAN) / STD
        xywh = torch.tensor([a["bbox"] for a in by_image[im["id"]]], dtype=torch.float32) * scale
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        labels = torch.tensor([label_of[a["category_id"]] for a in by_image[im["id"]]])
        targets.append({"boxes": boxes, "labels": labels})
        metas.append({"file_name": im["file_name"], "size": (h, w)})
    return batch, targets, metas, names


def fit(net, loss_fn, images, targets, steps: int, lr: float) -> None:
    params = [p for p in net.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    net.train()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        losses = loss_fn(net(images), targets)
        optim.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optim.step()
        if step == 1 or step % 25 == 0 or step == steps:
            print(
                f"step {step:4d}/{steps}  loss {losses['loss'].item():.3f}  (focal {losses['loss_cls'].item():.3f},"
                f" box {losses['loss_box'].item():.3f}, {int(losses['num_foreground'])} fg anchors)"
                f"  {time.perf_counter() - start:.0f}s",
                flush=True,
            )


def report(dets: list[dict], targets: list[dict], metas: list[dict], names: dict[int, str], top: int) -> float:
    """Prints the best detections per image and returns the share of boxes found (IoU >= 0.5, right class)."""
    found = total = 0
    for det, tgt, meta in zip(dets, targets, metas, strict=True):
        print(f"\n{meta['file_name']}  ({len(tgt['boxes'])} ground-truth boxes)")
        for box, score, label in list(zip(det["boxes"], det["scores"], det["labels"], strict=True))[:top]:
            print(f"  {names[int(label)]:>14s} {score:.2f}  [{', '.join(f'{v:5.0f}' for v in box.tolist())}]")
        if len(det["boxes"]) and len(tgt["boxes"]):
            iou = box_iou(tgt["boxes"], det["boxes"][det["scores"] > 0.3])
            same = tgt["labels"][:, None] == det["labels"][det["scores"] > 0.3][None, :]
            found += int(((iou >= 0.5) & same).any(dim=1).sum())
        total += len(tgt["boxes"])
    return found / max(1, total)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="COCO folder with annotations/ and images/")
    ap.add_argument("--images", type=int, default=4, help="how many images to fit and show")
    ap.add_argument("--size", type=int, default=256, help="longer image side in pixels")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weights", type=Path, help="torchvision retinanet_resnet50_fpn COCO weights file (local)")
    args = ap.parse_args()
    if not (args.data / "annotations").is_dir():
        raise SystemExit(f"no COCO data at {args.data}: pass --data DIR (with annotations/ and images/train2017/)")
    torch.manual_seed(0)
    torch.set_flush_denormal(True)  # a nearly fitted model makes denormal gradients, 10x slower on CPU
    images, targets, metas, names = load_coco(args.data, args.images, args.size)
    print(f"{len(metas)} COCO images, {sum(len(t['boxes']) for t in targets)} boxes, batch {tuple(images.shape)}")
    if args.weights:
        # torchvision's COCO head has 91 outputs indexed by COCO category id; map back to names.
        cfg = model.torchvision_config("v1")
        net, loss_fn, postprocess = model.build_retinanet(cfg)
        model.load_torchvision_state_dict(net, torch.load(args.weights, map_location="cpu", weights_only=True))
    else:
        cfg = model.RetinaNetConfig(
            num_classes=80, backbone="resnet18", backbone_norm="bn", trainable_stages=5, fpn_channels=64,
            head_num_convs=2,
        )  # fmt: skip
        net, loss_fn, postprocess = model.build_retinanet(cfg)
        print(f"fitting a small RetinaNet (ResNet-18 FPN, {sum(p.numel() for p in net.parameters()) / 1e6:.1f} M)")
        fit(net, loss_fn, images, targets, args.steps, args.lr)
    net.eval()
    with torch.no_grad():
        dets = postprocess(net(images), [m["size"] for m in metas])
    if args.weights:
        coco = json.loads((args.data / "annotations" / "instances_train2017.json").read_text())
        cat_names = {c["id"]: c["name"] for c in coco["categories"]}
        names = {i: cat_names.get(i, f"class {i}") for i in range(91)}
        cats = sorted(cat_names)
        targets = [{**t, "labels": torch.tensor([cats[int(v)] for v in t["labels"]])} for t in targets]
    recall = report(dets, targets, metas, names, top=5)
    print(f"\nground-truth boxes found (IoU >= 0.5, right class, score > 0.3): {recall:.0%}")


if __name__ == "__main__":
    main()
