"""Helpers shared by the CPU benchmark scripts: round-robin timing, equality checks, random targets."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

Targets = list[dict[str, torch.Tensor]]


def time_many(fns: dict[str, Callable[[], object]], warmup: int, reps: int) -> dict[str, dict[str, float]]:
    """Round-robin over the callables (so drift hits all alike), ``warmup`` untimed rounds first;
    median and IQR in ms of each."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {key: [] for key in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[key].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for key, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        out[key] = {"median_ms": statistics.median(ts), "iqr_ms": q[2] - q[0]}
    return out


def time_pair(tv_fn: Callable[[], object], our_fn: Callable[[], object], warmup: int, reps: int) -> dict[str, float]:
    """Alternates the two callables; medians and IQRs in ms, and ``speedup`` = torchvision / ours."""
    t = time_many({"tv": tv_fn, "ours": our_fn}, warmup, reps)
    out = {f"{key}_{stat}": t[key][stat] for key in ("tv", "ours") for stat in ("median_ms", "iqr_ms")}
    out["speedup"] = out["tv_median_ms"] / out["ours_median_ms"]
    return out


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().detach() / b.abs().detach().clamp(min=1e-12))


def check(name: str, diff: float, checks: dict[str, float], tol: float = 1e-4, kind: str = "relative diff") -> None:
    """Records ``diff`` under ``name`` and stops the benchmark when it is not below ``tol``."""
    checks[name] = diff
    print(f"check {name}: {kind} {diff:.2e} ({'OK' if diff < tol else 'FAIL'}, tol {tol:g})")
    if diff >= tol:
        raise SystemExit(f"check {name} failed: the two models do not compute the same thing")


def random_targets(n: int, num_boxes: int, size: int, num_classes: int, gen: torch.Generator) -> Targets:
    """Valid xyxy pixel boxes inside a ``size`` x ``size`` image, sides 16 .. size/2, labels in [0, K)."""
    out = []
    for _ in range(n):
        wh = torch.rand(num_boxes, 2, generator=gen) * (size / 2 - 16) + 16
        xy = torch.rand(num_boxes, 2, generator=gen) * (size - wh)
        boxes = torch.cat([xy, xy + wh], dim=1)
        out.append({"boxes": boxes, "labels": torch.randint(0, num_classes, (num_boxes,), generator=gen)})
    return out
