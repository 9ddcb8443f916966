"""The benchmark scripts run on this machine at a small size (the GPU one on the CPU), check that both
models compute the same loss, and write their tables; no timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_gpu_benchmark_runs_on_the_cpu_at_a_small_size(tmp_path) -> None:
    out = _run("bench_gpu.py", "--device", "cpu", "--quick", "--json", str(tmp_path / "gpu.json"))
    assert "same-weights loss check" in out and "| variant | ms/step" in out
    rows = {r["variant"]: r for r in json.loads((tmp_path / "gpu.json").read_text())["rows"]}
    assert {"torchvision fp32", "torchvision bf16 autocast", "ours fp32", "ours bf16 + channels_last"} <= set(rows)
    assert all(r["img_s"] > 0 and r["ms"] > 0 for r in rows.values())


def test_cpu_benchmark_checks_equality_and_times_every_variant(tmp_path) -> None:
    out = _run("bench_cpu.py", "--quick", "--json", str(tmp_path / "cpu.json"))
    result = json.loads((tmp_path / "cpu.json").read_text())
    assert all("OK" in line for line in out.splitlines() if line.startswith("check "))
    assert set(result["results"]) == {"loss forward", "loss forward+backward", "postprocess", "training step"}
    variants = result["training_step_variants"]
    assert set(variants) == {"ours", "ours channels_last", "torchvision channels_last", "hardware limit"}
    assert all(v["vs_torchvision"] > 0 for k, v in variants.items() if k != "hardware limit")
    limit = variants["hardware limit"]
    assert 0 < limit["tv_conv_ms"] < limit["tv_step_ms"] and limit["max_speedup"] > 1
    assert result["results"]["training step"]["ours_variant"] in variants
    assert "could be at most" in out


def test_static_shape_benchmark_runs_every_variant(tmp_path) -> None:
    """Eager and compiled (inductor on the CPU), natural and static padding, on tiny sizes. Two steps: the
    natural layout meets two shapes; a third shape costs a dynamic-shape recompile (50 s more here)."""
    out = _run("bench_static.py", "--steps", "2", "--sizes", "64,96", "--max-size", "128", "--pad-to", "128",
               "--batch", "1", "--json", str(tmp_path / "static.json"))  # fmt: skip
    rows = {r["variant"]: r for r in json.loads((tmp_path / "static.json").read_text())["rows"]}
    assert set(rows) == {f"{layout} {how}" for layout in ("natural", "static")
                         for how in ("eager", "compiled (default)")}  # fmt: skip
    assert rows["natural eager"]["input_shapes"] == 2 and rows["static eager"]["input_shapes"] == 1
    assert rows["static compiled (default)"]["graphs"] >= 1
    assert rows["natural eager"]["graphs"] == 0 and "| variant | distinct input shapes" in out


def test_export_benchmark_checks_and_times_both_runtimes(tmp_path) -> None:
    out = _run("bench_export.py", "--quick", "--json", str(tmp_path / "export.json"))
    result = json.loads((tmp_path / "export.json").read_text())
    assert [r["batch"] for r in result["rows"]] == [1] and all(d < 1e-4 for d in result["checks"].values())
    assert result["rows"][0]["ratio"] > 0 and "onnxruntime ms" in out
