"""DALI decode and box-aware augmentation: JPEG bytes + boxes -> padded, normalised batches.

Boxes enter DALI relative to the image (0..1, xyxy) so flip and crop keep them exact; after the
resize they are scaled by the resized size, which is exactly where the image content went.
"""

from __future__ import annotations

from dataclasses import dataclass

from nvidia.dali import fn, pipeline_def, types

MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]
SIZE_DIVISOR = 128


@dataclass(kw_only=True)
class AugmentConfig:
    """Training augmentation (the paper: flip, shorter side 800, longer side at most 1333)."""

    train_sizes: tuple[int, ...] = (640, 672, 704, 736, 768, 800)
    eval_size: int = 800
    max_size: int = 1333
    flip_prob: float = 0.5
    iou_crop: bool = False
    # > 0: every training batch padded to pad_to x pad_to (a multiple of 128, >= max_size): one input shape for the
    # whole run, so torch.compile builds one graph and CUDA graphs can replay; 0: the batch's own size
    pad_to: int = 0

    def __post_init__(self) -> None:
        if not self.train_sizes or min(self.train_sizes) < 32 or self.eval_size < 32:
            raise ValueError(f"image sizes must be >= 32 px, got {self.train_sizes} and {self.eval_size}")
        if self.max_size < max(*self.train_sizes, self.eval_size):
            raise ValueError(f"max_size {self.max_size} is below the largest shorter-side size")
        if self.pad_to and (self.pad_to % SIZE_DIVISOR or self.pad_to < self.max_size):
            raise ValueError(
                f"pad_to must be 0 or a multiple of {SIZE_DIVISOR} no smaller than max_size {self.max_size}, "
                f"got {self.pad_to} (e.g. {-(-self.max_size // SIZE_DIVISOR) * SIZE_DIVISOR})"
            )
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")


@pipeline_def(enable_conditionals=False)
def detection_pipeline(reader, train: bool, aug: AugmentConfig, gpu: bool):
    """Outputs: images ``[N, 3, H, W]`` float (padded to the batch maximum rounded up to 128, or to
    ``aug.pad_to`` square in training),
    resized shapes ``[N, 3]`` (h, w, c), boxes ``[N][M_i, 4]`` relative xyxy, labels ``[N][M_i]``,
    flip flags ``[N]``. ``reader`` is a callable returning a batch of (jpeg, boxes, labels)."""
    jpegs, boxes, labels = fn.external_source(
        source=reader, num_outputs=3, batch=True, dtype=[types.UINT8, types.FLOAT, types.INT32]
    )
    images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
    if train:
        if aug.iou_crop:
            begin, size, boxes, labels = fn.random_bbox_crop(
                boxes,
                labels,
                device="cpu",
                bbox_layout="xyXY",
                aspect_ratio=[0.5, 2.0],
                thresholds=[0.1, 0.3, 0.5, 0.7, 0.9],
                scaling=[0.3, 1.0],
                allow_no_crop=True,
                num_attempts=50,
            )
            images = fn.slice(images, begin, size, out_of_bounds_policy="trim_to_shape")
        flip = fn.random.coin_flip(probability=aug.flip_prob, dtype=types.INT32)
        boxes = fn.bb_flip(boxes, ltrb=True, horizontal=flip)
        shorter = fn.random.choice(list(aug.train_sizes)) if len(aug.train_sizes) > 1 else aug.train_sizes[0]
    else:
        flip = fn.constant(idata=0, dtype=types.INT32)
        shorter = aug.eval_size
    images = fn.resize(images, resize_shorter=fn.cast(shorter, dtype=types.FLOAT), max_size=aug.max_size)
    shapes = images.shape(dtype=types.INT32)
    images = fn.crop_mirror_normalize(images, mirror=flip, mean=MEAN, std=STD, output_layout="CHW", dtype=types.FLOAT)
    # ``shape`` is a minimum: with pad_to >= max_size every image fits, so every batch is pad_to square
    shape = (aug.pad_to, aug.pad_to) if aug.pad_to and train else None
    images = fn.pad(images, axes=(1, 2), align=SIZE_DIVISOR, shape=shape, fill_value=0.0)
    return images, shapes, boxes, labels, flip
