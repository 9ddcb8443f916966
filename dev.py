#!/usr/bin/env python3
"""Project set-up and the two Quick-start commands: ``python3 dev.py demo`` and ``python3 dev.py test``.

Creates ``.venv`` with pip, installs the exact pins of ``pyproject.toml`` (skipped when they have not
changed since the last install), then runs the demo or the whole test suite (ruff, the import
contract, pytest). Needs nothing but Python 3.11.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / "bin" / "python"
STAMP = VENV / ".installed-pins"


def requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["test"]]


def ensure_env() -> None:
    """Idempotent: a venv whose stamp matches the pins is used as it is."""
    if sys.version_info[:2] != (3, 11):
        sys.exit(f"Python 3.11 is required (torch 2.14.1 wheels); this is {sys.version.split()[0]}")
    reqs = requirements()
    digest = hashlib.sha256("\n".join(reqs).encode()).hexdigest()
    if PYTHON.exists() and STAMP.exists() and STAMP.read_text() == digest:
        return
    if not PYTHON.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=VENV.exists()).create(VENV)
    print("installing pinned requirements (first time takes a few minutes)", flush=True)
    run([str(PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *reqs])
    STAMP.write_text(digest)


def run(cmd: list[str]) -> int:
    code = subprocess.call(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if code and cmd[1:3] == ["-m", "pip"]:
        sys.exit(f"pip install failed (exit {code}); see the messages above")
    return code


def test(args: list[str]) -> int:
    bin_ = VENV / "bin"
    steps = [
        ("ruff", [str(bin_ / "ruff"), "check", "."]),
        ("ruff format", [str(bin_ / "ruff"), "format", "--check", "--quiet", "."]),
        ("import contract", [str(bin_ / "lint-imports"), "--no-cache"]),
        ("pytest", [str(PYTHON), "-m", "pytest", *args]),
    ]
    failed = []
    for name, cmd in steps:
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        if run(cmd) != 0:
            failed.append(name)
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    return 0


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("demo", "test", "setup"):
        print(__doc__)
        print("usage: python3 dev.py {demo|test|setup} [args passed through]")
        return 2
    command, args = sys.argv[1], sys.argv[2:]
    ensure_env()
    if command == "setup":
        return 0
    if command == "test":
        return test(args)
    return run([str(PYTHON), "jobs/demo.py", *args])


if __name__ == "__main__":
    sys.exit(main())
