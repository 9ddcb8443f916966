"""What a cluster must install, read from ``pyproject.toml``: the project's name, its exact pins, and the Ray
version a container image carries. Shared by the launcher checks and the KubeRay checks.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]  # `ray up` runs here: file_mounts' local paths are relative to it
SHARED_STORAGE = ("s3://", "gs://")
_REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?(?:(===|==|~=|!=|<=|>=|<|>)(\S+))?$")


@dataclass(frozen=True)
class Project:
    """The pins the cluster must install: ``pyproject.toml``'s name and == pins."""

    name: str
    pins: dict[str, str]  # normalised name -> version


def read_project(pyproject: Path = REPO_ROOT / "pyproject.toml") -> Project:
    """Reads ``pyproject.toml``; every dependency must be an exact ``==`` pin (the premise of these checks)."""
    with open(pyproject, "rb") as f:
        meta = tomllib.load(f)["project"]
    pins = {}
    for dep in meta["dependencies"]:
        req = parse_requirement(dep.replace(" ", ""))
        if req is None or req[1] != "==":
            raise ValueError(f"{pyproject}: dependency {dep!r} is not an exact == pin")
        pins[req[0]] = req[2]
    return Project(meta["name"], pins)


def normalize(name: str) -> str:
    """PEP 503 name: ``Nvidia_DALI.cuda130`` and ``nvidia-dali-cuda130`` are the same package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_requirement(text: str) -> tuple[str, str, str] | None:
    """``name[extras]==1.0`` -> (normalised name, operator or "", version or ""); None if not a requirement."""
    m = _REQUIREMENT.match(text)
    return (normalize(m.group(1)), m.group(3) or "", m.group(4) or "") if m else None


def pin_problems(where: str, requirements: list[str], project: Project) -> list[str]:
    """One problem per requirement that names a pinned package with another version (or none)."""
    problems = []
    for text in requirements:
        name, op, version = parse_requirement(text) or ("", "", "")
        pin = project.pins.get(name)
        if pin is not None and (op, version) != ("==", pin):
            problems.append(f"{where}: installs {text} but pyproject.toml pins {name}=={pin}")
    return problems


def image_ray_version(image: str) -> str | None:
    """The Ray version an image tag names: ``rayproject/ray:2.60.0-py311-gpu`` -> ``2.60.0``; None if none."""
    repo, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
    if repo.rsplit("/", 1)[-1] in ("ray", "ray-ml", "ray-llm"):
        found = re.match(r"(\d+\.\d+\.\d+)", tag)
    else:  # an image of your own: name the Ray version in its tag, e.g. retinanet:0.1.0-ray2.60.0
        found = re.search(r"ray-?(\d+\.\d+\.\d+)", tag)
    return found.group(1) if found else None


def check_image(image: str, project: Project, where: str) -> list[str]:
    """The image must name the pinned Ray version in its tag (a mismatch fails at ``ray start``)."""
    ray, pin = image_ray_version(image), project.pins["ray"]
    if ray is None:
        return [f"{where}: cannot tell the Ray version of image {image!r}; use rayproject/ray:{pin}-py311-gpu"]
    return [f"{where}: image {image} has Ray {ray} but pyproject.toml pins ray=={pin}"] if ray != pin else []
