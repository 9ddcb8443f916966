"""The design guide's size rule for the product code: every function under 60 lines (the training loop above
all is a short step plus hooks)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "pipeline", "engine", "jobs", "cluster")
MAX_LINES = 60


def test_every_function_is_under_60_lines() -> None:
    long = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_LINES:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these functions:\n" + "\n".join(long)


def test_the_training_loop_is_a_short_step_plus_hooks() -> None:
    tree = ast.parse((ROOT / "engine" / "loop.py").read_text())
    (run_worker,) = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "run_worker"]
    assert run_worker.end_lineno - run_worker.lineno + 1 <= 25
