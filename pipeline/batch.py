"""The only contract between the data pipeline and the model: plain tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """A batch of N augmented images, padded to one size (a multiple of 128).

    - ``images``: ``[N, 3, H, W]`` float32, ImageNet-normalised RGB, zero padding right and bottom.
    - ``image_sizes``: ``[N, 2]`` int64 ``(h, w)`` of each image after resize, before padding.
    - ``original_sizes``: ``[N, 2]`` int64 ``(height, width)`` of the source images.
    - ``image_ids``: ``[N]`` int64 ids of the source images (COCO ids).
    - ``boxes``: ``[N, M, 4]`` float32 xyxy pixels of the resized (and flipped, cropped) image; rows
      past ``num_boxes[i]`` are zero padding. ``M = max(num_boxes)`` (at least 1).
    - ``labels``: ``[N, M]`` int64 contiguous labels ``0..K-1``; padding is -1.
    - ``num_boxes``: ``[N]`` int64.
    - ``flipped``: ``[N]`` bool, horizontally flipped.

    All tensors are on one device: the GPU when DALI decoded there, else the CPU (``to`` moves them).
    """

    images: torch.Tensor
    image_sizes: torch.Tensor
    original_sizes: torch.Tensor
    image_ids: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor
    num_boxes: torch.Tensor
    flipped: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        return Batch(**{k: v.to(device, non_blocking=non_blocking) for k, v in vars(self).items()})

    def targets(self) -> list[dict[str, torch.Tensor]]:
        """The model's loss targets: one ``{"boxes": [M_i, 4], "labels": [M_i]}`` per image."""
        counts = self.num_boxes.tolist()
        return [{"boxes": self.boxes[i, :m], "labels": self.labels[i, :m]} for i, m in enumerate(counts)]

    def padded_targets(self) -> dict[str, torch.Tensor]:
        """The same targets as one padded dict, ``boxes [N, M, 4]`` and ``labels [N, M]`` (-1 on padding
        rows), for the loss's batched form: no per-image slicing and no host sync (``targets()`` reads
        ``num_boxes`` back from the device)."""
        return {"boxes": self.boxes, "labels": self.labels}

    def scale_to_original(self, boxes: torch.Tensor, index: int) -> torch.Tensor:
        """Boxes ``[D, 4]`` predicted on image ``index`` of this batch -> pixels of its source image
        (undoes the resize; predictions are made on unflipped evaluation batches)."""
        scale = self.original_sizes[index].flip(0).float() / self.image_sizes[index].flip(0).float()  # (sx, sy)
        return boxes * scale.repeat(2).to(boxes.device)
