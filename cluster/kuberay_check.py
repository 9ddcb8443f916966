"""Offline checks of a KubeRay manifest (``RayCluster`` + ``RayJob``) that neither Kubernetes nor KubeRay do
before the pods start: Ray version and pins as ``pyproject.toml``, token auth on, ``/tmp/ray`` mounted, GPU
limits agreeing with ``num-gpus``, a grace period long enough for a checkpoint upload, and a RayJob that runs
``jobs/train.py`` against shared object storage.

Run through ``python -m cluster.validate cluster/kuberay.yaml`` (:func:`cluster.validate.check` dispatches here).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from cluster.project import (
    REPO_ROOT,
    SHARED_STORAGE,
    Project,
    check_image,
    parse_requirement,
    pin_problems,
    read_project,
)

MIN_GRACE_S = 120  # a checkpoint upload of a few hundred MB, with margin


def is_kuberay(path: str | Path) -> bool:
    """Kubernetes manifests carry apiVersion + kind; launcher YAMLs carry provider."""
    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if isinstance(d, dict)]
    except yaml.YAMLError:
        return False
    return any("apiVersion" in d and "kind" in d for d in docs)


def check_kuberay(path: str | Path, *, root: Path = REPO_ROOT) -> list[str]:
    """Checks a multi-document KubeRay manifest (RayCluster + RayJob); an empty list means none failed."""
    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    except yaml.YAMLError as e:
        raise ValueError(f"not valid YAML: {e}") from e
    return kuberay_problems(docs, root=root)


def kuberay_problems(docs: list[dict], *, root: Path = REPO_ROOT) -> list[str]:
    """:func:`check_kuberay` on already loaded documents."""
    project = read_project(root / "pyproject.toml")
    clusters = {(d.get("metadata") or {}).get("name", "?"): d for d in docs if d.get("kind") == "RayCluster"}
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    problems = []
    if not clusters and not any((j.get("spec") or {}).get("rayClusterSpec") for j in jobs):
        problems.append("no RayCluster document, and no RayJob with its own rayClusterSpec")
    if not jobs:
        problems.append("no RayJob document (the job that runs jobs/train.py)")
    for name, doc in clusters.items():
        problems += _check_cluster_spec(doc.get("spec") or {}, f"RayCluster {name}", project)
    for job in jobs:
        problems += _check_rayjob(job, clusters, project)
    return problems


def _check_cluster_spec(spec: dict, where: str, project: Project) -> list[str]:
    pin = project.pins["ray"]
    problems = []
    if str(spec.get("rayVersion")) != pin:
        problems.append(f"{where}: spec.rayVersion {spec.get('rayVersion')!r} but pyproject.toml pins ray=={pin}")
    if (spec.get("authOptions") or {}).get("mode") != "token":
        problems.append(f"{where}: token authentication is off: set spec.authOptions.mode: token (KubeRay >= 1.5.1)")
    head = spec.get("headGroupSpec")
    if head:
        problems += _check_group(head, f"{where} headGroupSpec", project, is_worker=False)[0]
    else:
        problems.append(f"{where}: no headGroupSpec")
    num_gpu_groups = 0
    for group in spec.get("workerGroupSpecs") or []:
        group_problems, has_gpus = _check_group(group, f"{where} workerGroupSpec {group.get('groupName')}", project)
        problems += group_problems
        num_gpu_groups += has_gpus
    if not num_gpu_groups:
        problems.append(f"{where}: no workerGroupSpec with an nvidia.com/gpu limit")
    return problems


def _check_group(group: dict, where: str, project: Project, *, is_worker: bool = True) -> tuple[list[str], bool]:
    """Problems of one head or worker group, and whether it has GPUs. KubeRay's Ray container is the first."""
    pod = (group.get("template") or {}).get("spec") or {}
    containers = pod.get("containers") or []
    if not containers:
        return [f"{where}: no containers"], False
    ray = containers[0]
    problems = check_image(ray.get("image", ""), project, where)
    mounts = {m.get("mountPath", "").rstrip("/"): m.get("name") for m in ray.get("volumeMounts") or []}
    volumes = {v.get("name") for v in pod.get("volumes") or []}
    if "/tmp/ray" not in mounts:
        problems.append(f"{where}: no volumeMount at /tmp/ray (an emptyDir for Ray's logs, as the KubeRay docs advise)")
    elif mounts["/tmp/ray"] not in volumes:
        problems.append(f"{where}: the /tmp/ray mount names volume {mounts['/tmp/ray']!r}, which the pod lacks")
    limits = (ray.get("resources") or {}).get("limits") or {}
    num_gpus = int(limits.get("nvidia.com/gpu", 0))
    declared = (group.get("rayStartParams") or {}).get("num-gpus")
    if num_gpus and declared is not None and float(declared) != num_gpus:
        problems.append(f"{where}: nvidia.com/gpu limit {num_gpus} but rayStartParams num-gpus {declared}")
    grace = pod.get("terminationGracePeriodSeconds", 30)  # Kubernetes' default
    if num_gpus and is_worker and grace < MIN_GRACE_S:
        problems.append(
            f"{where}: terminationGracePeriodSeconds {grace} is under {MIN_GRACE_S}: too short for a checkpoint upload"
        )
    return problems, num_gpus > 0


def _check_rayjob(job: dict, clusters: dict[str, dict], project: Project) -> list[str]:
    where = f"RayJob {(job.get('metadata') or {}).get('name', '?')}"
    spec = job.get("spec") or {}
    entrypoint = spec.get("entrypoint") or ""
    problems = []
    if not re.search(r"(^|[\s/])jobs/train\.py\b", entrypoint):
        problems.append(f"{where}: entrypoint does not run jobs/train.py")
    storage = re.search(r"checkpoint\.storage_path=(\S+)", entrypoint)
    if storage is None or not storage.group(1).startswith(SHARED_STORAGE):
        value = storage.group(1) if storage else "(not set: the recipe's default)"
        problems.append(f"{where}: checkpoint.storage_path {value} is not shared object storage; use s3:// or gs://")
    selector = (spec.get("clusterSelector") or {}).get("ray.io/cluster")
    cluster_spec = spec.get("rayClusterSpec")
    if cluster_spec:
        problems += _check_cluster_spec(cluster_spec, f"{where} rayClusterSpec", project)
    elif not selector:
        problems.append(f"{where}: needs spec.clusterSelector (ray.io/cluster: <RayCluster>) or spec.rayClusterSpec")
    elif clusters and selector not in clusters:
        problems.append(f"{where}: clusterSelector ray.io/cluster={selector} names none of {', '.join(clusters)}")
    if selector and spec.get("submissionMode") == "SidecarMode":
        problems.append(f"{where}: submissionMode SidecarMode does not work with clusterSelector")
    if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
        problems.append(f"{where}: ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true (KubeRay rejects it)")
    target = cluster_spec or (clusters.get(selector) or {}).get("spec") or {}
    head_containers = (((target.get("headGroupSpec") or {}).get("template") or {}).get("spec") or {}).get("containers")
    image = (head_containers or [{}])[0].get("image", "")
    return problems + _check_runtime_env(spec, where, project, image)


def _check_runtime_env(spec: dict, where: str, project: Project, image: str) -> list[str]:
    """The job's code and pins: working_dir for a relative entrypoint, pyproject's pins under pip."""
    try:
        env = yaml.safe_load(spec.get("runtimeEnvYAML") or "") or {}
    except yaml.YAMLError as e:
        return [f"{where}: runtimeEnvYAML is not valid YAML: {e}"]
    problems = []
    if re.search(r"(^|\s)python3?\s+jobs/", spec.get("entrypoint") or "") and not env.get("working_dir"):
        problems.append(f"{where}: the entrypoint runs jobs/ by a relative path but runtimeEnvYAML has no working_dir")
    pip = env.get("pip")
    packages = pip.get("packages") if isinstance(pip, dict) else pip
    if packages is None:
        if image.startswith("rayproject/"):
            problems.append(f"{where}: stock image {image} lacks the project's pins: list them in runtimeEnvYAML pip")
        return problems
    problems += pin_problems(f"{where} runtimeEnvYAML", [p.replace(" ", "") for p in packages], project)
    names = {(parse_requirement(p.replace(" ", "")) or ("",))[0] for p in packages}
    missing = [f"{n}=={v}" for n, v in project.pins.items() if n not in names and n != "ray"]  # ray: the image's
    if missing:
        problems.append(f"{where}: runtimeEnvYAML pip lacks these pins of pyproject.toml: {', '.join(missing)}")
    return problems
