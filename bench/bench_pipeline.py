"""Data pipeline throughput on this CPU: ours (shards -> DALI) against what a torchvision user would
write, and against raw JPEG decode speed (the limit here).

- ours: ``DetectionLoader`` in training mode (flip, shorter side from 640..800, longer <= 1333,
  normalise, pad to 128) from coco128 shards in a local folder and in an S3-protocol server (moto_server
  subprocess on 127.0.0.1).
- reference: PIL decode + torchvision.transforms.v2 (flip, RandomShortestSize, normalise, box-aware)
  in a ``torch.utils.data.DataLoader`` with 2 worker processes, padding in the collate function.
- raw decode: PIL and DALI decode only, every image once per pass, 2 threads.
- flaky S3: ours through ``tests/fault_proxy.py`` in front of the same server, 1% of reads reset mid-body
  and 5% answered 503 SlowDown: images/s against the clean S3 row, and images lost per completed epoch.

    python bench/bench_pipeline.py [--images 512] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.dali import AugmentConfig  # noqa: E402
from pipeline.loader import DetectionLoader, LoaderConfig, open_dataset  # noqa: E402

COCO = ROOT.parent / "shared" / "data" / "coco128"
SIZES = (640, 672, 704, 736, 768, 800)


def convert(output: str) -> None:
    cmd = [sys.executable, str(ROOT / "jobs" / "convert.py"), "--annotations",
           str(COCO / "annotations" / "instances_train2017.json"), "--images", str(COCO / "images" / "train2017"),
           "--output", output, "--shard-images", "32"]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def ours(uri: str, num_images: int, batch: int, lost: list[int] | None = None) -> float:
    """Images/s of the training stream; ``lost`` gets, per epoch it completed, the images it did not hand out."""
    cfg = LoaderConfig(batch_size=batch, num_workers=2, num_threads=2, aug=AugmentConfig(train_sizes=SIZES))
    dataset = open_dataset(uri)
    loader = DetectionLoader(dataset, rank=0, world_size=1, train=True, cfg=cfg)
    stream = iter(loader)
    for _ in range(3):  # warm-up: pipeline build, first shards
        next(stream)
    start, seen = time.perf_counter(), 0
    while seen < num_images:
        seen += len(next(stream))
    rate = seen / (time.perf_counter() - start)
    if lost is not None:
        epochs = loader.seen()
        lost += [dataset.manifest["num_images"] - epochs[e][0] for e in sorted(epochs)[:-1]]
    return rate


def flaky(uri: str, num_images: int, batch: int) -> tuple[float, list[int], dict]:
    """``ours`` through the fault proxy: 1% of reads reset after 64 KB, 5% answered 503 SlowDown."""
    from urllib.parse import urlparse

    from tests.fault_proxy import FaultProxy

    clean = os.environ["AWS_ENDPOINT_URL"]
    lost: list[int] = []
    with FaultProxy(urlparse(clean).port, seed=1) as proxy:
        proxy.reset(share=0.01, after_bytes=64 << 10)
        proxy.slowdown(share=0.05)
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
        try:
            rate = ours(uri, num_images, batch, lost)
        finally:
            os.environ["AWS_ENDPOINT_URL"] = clean
        return rate, lost, dict(proxy.stats)


class TorchvisionStyle(torch.utils.data.Dataset):
    """What a torchvision user writes: PIL decode, v2 transforms with BoundingBoxes."""

    def __init__(self) -> None:
        from torchvision.transforms import v2

        data = json.loads((COCO / "annotations" / "instances_train2017.json").read_text())
        self.images = sorted(data["images"], key=lambda i: i["id"])
        self.anns: dict[int, list] = {}
        for a in data["annotations"]:
            self.anns.setdefault(a["image_id"], []).append(a)
        self.transform = v2.Compose([
            v2.RandomHorizontalFlip(), v2.RandomShortestSize(list(SIZES), max_size=1333),
            v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ])  # fmt: skip

    def __len__(self) -> int:
        return 1 << 30  # endless, like our training stream

    def __getitem__(self, index: int):
        from PIL import Image
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as F

        im = self.images[index % len(self.images)]
        pil = Image.open(COCO / "images" / "train2017" / im["file_name"]).convert("RGB")
        xywh = torch.tensor([a["bbox"] for a in self.anns.get(im["id"], [])], dtype=torch.float32).reshape(-1, 4)
        boxes = tv_tensors.BoundingBoxes(xywh, format="XYWH", canvas_size=(im["height"], im["width"]))
        image, boxes = self.transform(tv_tensors.Image(F.pil_to_tensor(pil)), boxes)
        return image, boxes


def pad_collate(items):
    h = max(i[0].shape[1] for i in items)
    w = max(i[0].shape[2] for i in items)
    h, w = -(-h // 128) * 128, -(-w // 128) * 128
    out = torch.zeros(len(items), 3, h, w)
    for k, (image, _) in enumerate(items):
        out[k, :, : image.shape[1], : image.shape[2]] = image
    return out, [b for _, b in items]


def reference(num_images: int, batch: int) -> float:
    loader = torch.utils.data.DataLoader(
        TorchvisionStyle(), batch_size=batch, num_workers=2, collate_fn=pad_collate, shuffle=False
    )
    it = iter(loader)
    for _ in range(3):
        next(it)
    start, seen = time.perf_counter(), 0
    while seen < num_images:
        seen += len(next(it)[0])
    rate = seen / (time.perf_counter() - start)
    del it
    return rate


def raw_pil(passes: int) -> float:
    from PIL import Image

    files = [f.read_bytes() for f in sorted((COCO / "images" / "train2017").glob("*.jpg"))]

    def decode(data: bytes) -> None:
        import io

        Image.open(io.BytesIO(data)).convert("RGB").load()

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(decode, files))
        start = time.perf_counter()
        for _ in range(passes):
            list(pool.map(decode, files))
    return passes * len(files) / (time.perf_counter() - start)


def raw_dali(passes: int, batch: int, stage: int = 0) -> float:
    """DALI CPU throughput up to ``stage``: 0 decode, 1 + resize, 2 + normalise, 3 + pad."""
    from nvidia.dali import fn, pipeline_def, types

    files = [np.frombuffer(f.read_bytes(), np.uint8) for f in sorted((COCO / "images" / "train2017").glob("*.jpg"))]
    batches = [files[i : i + batch] for i in range(0, len(files) - batch + 1, batch)]
    state = {"i": 0}

    def source():
        out = batches[state["i"] % len(batches)]
        state["i"] += 1
        return out

    @pipeline_def(batch_size=batch, num_threads=2, device_id=None, exec_dynamic=True)
    def stages():
        x = fn.decoders.image(fn.external_source(source=source, batch=True), device="cpu", output_type=types.RGB)
        if stage >= 1:
            shorter = fn.cast(fn.random.choice(list(SIZES)), dtype=types.FLOAT)
            x = fn.resize(x, resize_shorter=shorter, max_size=1333)
        if stage >= 2:
            x = fn.crop_mirror_normalize(x, mean=[124.0, 116.0, 104.0], std=[58.0, 57.0, 57.0], dtype=types.FLOAT)
        if stage >= 3:
            x = fn.pad(x, axes=(1, 2), align=128, fill_value=0.0)
        return x

    pipe = stages()
    pipe.build()
    pipe.run()
    start = time.perf_counter()
    for _ in range(passes * len(batches)):
        pipe.run()
    return passes * len(batches) * batch / (time.perf_counter() - start)


def storage_limit(uri: str, passes: int) -> float:
    """Images per second that merely fetching every shard from ``uri`` allows (no decoding)."""
    from pipeline import storage

    ds = open_dataset(uri)
    start = time.perf_counter()
    for _ in range(passes):
        for shard in ds.shards:
            storage.read_bytes(shard)
    return passes * ds.manifest["num_images"] / (time.perf_counter() - start)


def start_s3() -> subprocess.Popen:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
    for _ in range(100):
        try:
            urllib.request.urlopen(os.environ["AWS_ENDPOINT_URL"] + "/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench")
    return proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=512, help="images timed per pipeline (after warm-up)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--stages", action="store_true", help="only the DALI stage breakdown (decode, resize, ...)")
    args = ap.parse_args()
    if args.stages:
        passes = max(1, args.images // 128)
        for stage, name in enumerate(["decode", "+ resize 640-800", "+ normalise float32 CHW", "+ pad to 128"]):
            print(f"| {name} | {raw_dali(passes, args.batch, stage):.0f} img/s |")
        return
    torch.set_num_threads(1)  # the loaders use their own workers and threads
    print(f"load average at start: {os.getloadavg()} (should be well below 2)")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        convert(tmp)
        rows["ours, local folder"] = ours(tmp, args.images, args.batch)
        proc = start_s3()
        try:
            convert("s3://bench/coco128")
            rows["ours, S3 (moto_server)"] = ours("s3://bench/coco128", args.images, args.batch)
            name = "ours, S3 through the fault proxy (1% of reads reset, 5% SlowDown)"
            rows[name], lost, faults = flaky("s3://bench/coco128", args.images, args.batch)
            clean = rows["ours, S3 (moto_server)"]
            print(f"{name}: {rows[name] / clean:.2f}x the clean S3 rate; images lost per completed epoch: {lost}; "
                  f"proxy: {faults}")  # fmt: skip
            rows["S3 read limit: fetching the shards from moto_server, no decode"] = storage_limit(
                "s3://bench/coco128", max(1, args.images // 128)
            )
        finally:
            proc.terminate()
    rows["reference: PIL + torchvision v2 + DataLoader(2 workers)"] = reference(args.images, args.batch)
    passes = max(1, args.images // 128)
    rows["raw decode, PIL, 2 threads"] = raw_pil(passes)
    rows["raw decode, DALI CPU, 2 threads"] = raw_dali(passes, args.batch)
    ref = rows["reference: PIL + torchvision v2 + DataLoader(2 workers)"]
    limit = max(rows["raw decode, PIL, 2 threads"], rows["raw decode, DALI CPU, 2 threads"])
    print("\n| pipeline | images/s | vs reference | vs raw decode |")
    print("|---|---|---|---|")
    for name, rate in rows.items():
        print(f"| {name} | {rate:.1f} | {rate / ref:.2f}x | {rate / limit:.0%} |")
    print(f"\nload average at end: {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
