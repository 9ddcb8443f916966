"""Offline checks of the deployment files in ``cluster/``: Ray's own validation plus what Ray does not check.

    python -m cluster.validate cluster/*.yaml        # prints each problem; exit status 1 if there is any

Launcher YAMLs (``ray up``): :func:`ray_validate` runs Ray's ``prepare_config`` + ``validate_config`` (the
schema; no cloud calls, no credentials) and :func:`check_launcher` checks that GPU counts match the machines,
setup installs exactly the pins of ``pyproject.toml``, storage is shared object storage, token auth is on and
EFA is wired on the machines that have it (the machine specs live in :mod:`cluster.machines`, the pins in
:mod:`cluster.project`). KubeRay manifests: :func:`cluster.kuberay_check.check_kuberay`; :func:`check`
dispatches a file to the right checks.

Nothing here contacts a cloud or starts Ray; the ``cluster`` package imports no other package of ours.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import re
import shlex
import sys
import tomllib
from pathlib import Path

import yaml

from cluster.kuberay_check import check_kuberay, is_kuberay
from cluster.machines import INSTANCE_KEY, MACHINES, Machine
from cluster.project import (
    REPO_ROOT,
    SHARED_STORAGE,
    Project,
    check_image,
    image_ray_version,
    parse_requirement,
    pin_problems,
    read_project,
)

AUTH_TOKEN_FILE = ".ray/auth_token"  # where Ray looks for the token (under the home directory)
EFA_ENV = {"FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1"}


def load_yaml(path: str | Path) -> dict:
    """One YAML document as a dict (``ValueError`` if it is not a mapping or does not parse)."""
    try:
        config = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"not valid YAML: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"expected a mapping at the top, got {type(config).__name__}")
    return config


def ray_validate(path_or_config: str | Path | dict) -> dict:
    """Ray's own offline validation, as ``ray up`` does it before any cloud call; returns the prepared config.

    ``prepare_config`` merges the provider's defaults.yaml (aws, gcp) or builds the single on-prem node type
    (local); ``validate_config`` checks the result against Ray's JSON schema. Neither needs credentials or
    the network: the cloud part of ``ray up`` (``bootstrap_config``: AMIs, subnets, IAM) comes after them.
    Raises ``ValueError`` with Ray's message when Ray rejects the config.
    """
    import click
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    if isinstance(path_or_config, dict):
        config = copy.deepcopy(path_or_config)
    else:
        config = load_yaml(path_or_config)
    try:
        prepared = prepare_config(config)
        validate_config(prepared)
    except jsonschema.ValidationError as e:
        where = ".".join(str(p) for p in e.absolute_path)
        raise ValueError(f"Ray rejects the config: {where + ': ' if where else ''}{e.message}") from e
    except click.ClickException as e:  # prepare_config's cli_logger.abort, e.g. node types on-prem
        raise ValueError(f"Ray rejects the config: {e.message}") from e
    except (ValueError, KeyError, TypeError, AssertionError, RuntimeError) as e:
        raise ValueError(f"Ray rejects the config: {e!r}") from e
    return prepared


# --- shell and pip parsing -------------------------------------------------------------------------------

_PIP_INSTALL = re.compile(r"(?:^|[\s;&|(])(?:uv\s+)?pip3?\s+install\s+([^;&|\n]*)")
_PIP_VALUE_OPTIONS = {"-r", "--requirement", "-c", "--constraint", "-i", "--index-url", "--extra-index-url",
                      "-f", "--find-links", "-t", "--target", "--prefix", "--root", "--src", "--cache-dir",
                      "--upgrade-strategy", "--trusted-host", "--timeout", "--retries", "--proxy"}  # fmt: skip
_ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.S)


def _words(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError:  # unbalanced quotes: good enough for finding names
        return text.split()


def pip_installs(command: str) -> tuple[list[str], list[str]]:
    """The requirement strings and the local paths (``-e /x``, ``./x``) that ``pip install`` gets in a command."""
    requirements, paths = [], []
    for m in _PIP_INSTALL.finditer(command):
        words = iter(_words(m.group(1)))
        for word in words:
            if word in ("-e", "--editable"):
                paths.append(next(words, ""))
            elif word.startswith("--editable="):
                paths.append(word.split("=", 1)[1])
            elif word in _PIP_VALUE_OPTIONS:
                next(words, None)
            elif word.startswith("-"):
                continue
            elif word.startswith((".", "/", "~")):
                paths.append(word)
            elif parse_requirement(word):
                requirements.append(word)
    return requirements, paths


def ray_start(command: str) -> tuple[dict[str, str], list[str]] | None:
    """(environment, arguments) of the ``ray start`` in one shell command, or None if it has none.

    The environment is what the command exports before it plus ``VAR=value`` prefixes of ``ray start``
    itself; a bare ``VAR=value;`` sets a shell variable that ``ray start`` does not see.
    """
    exported: dict[str, str] = {}
    for segment in re.split(r"&&|\|\||;|\n", command):
        words = _words(segment)
        if words[:1] == ["export"]:
            exported.update(m.groups() for w in words[1:] if (m := _ASSIGNMENT.match(w)))
            continue
        prefix: dict[str, str] = {}
        while words and (m := _ASSIGNMENT.match(words[0])):
            prefix[m.group(1)] = m.group(2)
            words = words[1:]
        if words[:2] == ["ray", "start"]:
            return {**exported, **prefix}, words[2:]
    return None


def _flag(args: list[str], name: str) -> str | None:
    """Value of ``--name=value`` or ``--name value`` among ``ray start`` arguments."""
    for i, arg in enumerate(args):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(args):
            return args[i + 1]
    return None


def docker_env(options: list[str]) -> dict[str, str]:
    """Variables set by ``-e K=V`` / ``--env K=V`` in docker run options (one option per list item or not)."""
    words = [w for option in options for w in _words(option)]
    env = {}
    for i, word in enumerate(words):
        value = None
        if word in ("-e", "--env") and i + 1 < len(words):
            value = words[i + 1]
        elif word.startswith("--env="):
            value = word.split("=", 1)[1]
        if value and (m := _ASSIGNMENT.match(value)):
            env[m.group(1)] = m.group(2)
    return env


# --- launcher YAML checks --------------------------------------------------------------------------------


def check_launcher(path: str | Path, *, root: Path = REPO_ROOT) -> list[str]:
    """Our checks of a ``ray up`` YAML that Ray does not do; an empty list means none failed.

    ``root`` is where ``ray up`` runs (file_mounts' relative local paths start there) and holds the
    ``pyproject.toml`` whose pins the cluster must install.
    """
    return launcher_problems(load_yaml(path), root=root)


def launcher_problems(config: dict, *, root: Path = REPO_ROOT) -> list[str]:
    """:func:`check_launcher` on an already loaded config."""
    project = read_project(root / "pyproject.toml")
    problems = [
        *_check_resources(config),
        *_check_install(config, project, root),
        *_check_auth(config),
        *_check_storage(config, project, root),
        *_check_efa(config),
        *_check_node_identity(config),
    ]
    return list(dict.fromkeys(problems))  # one message per distinct problem, in order


def _provider(config: dict) -> str:
    return config.get("provider", {}).get("type", "")


def _node_types(config: dict) -> dict[str, dict]:
    return config.get("available_node_types") or {}


def _machine(config: dict, node_type: dict) -> Machine | None:
    provider = _provider(config)
    return MACHINES.get(provider, {}).get(node_type.get("node_config", {}).get(INSTANCE_KEY.get(provider, "")))


def _check_resources(config: dict) -> list[str]:
    provider = _provider(config)
    if provider == "local":
        return _check_local_resources(config)
    if provider not in MACHINES:
        return [f"provider type {provider!r} is not checked here; known: aws, gcp, local"]
    problems = []
    for name, node_type in _node_types(config).items():
        key = INSTANCE_KEY[provider]
        instance = node_type.get("node_config", {}).get(key)
        machine = _machine(config, node_type)
        if machine is None:
            known = ", ".join(sorted(MACHINES[provider]))
            problems.append(f"node type {name}: unknown {key} {instance!r}; known: {known}")
            continue
        has = f"{machine.num_gpus} {machine.gpu} GPU{'s' * (machine.num_gpus > 1)}" if machine.num_gpus else "no GPU"
        resources = node_type.get("resources", {})
        if "GPU" not in resources:
            problems.append(f"node type {name}: resources must declare GPU: {machine.num_gpus} ({instance} has {has})")
        elif resources["GPU"] != machine.num_gpus:
            problems.append(f"node type {name}: {instance} has {has} but resources declare GPU: {resources['GPU']}")
        if "CPU" not in resources or resources["CPU"] > machine.num_cpus:
            problems.append(f"node type {name}: resources must declare CPU: 1..{machine.num_cpus} ({instance})")
        if provider == "gcp" and machine.num_gpus:
            problems += _check_guest_accelerators(name, instance, machine, node_type["node_config"])
    return problems


def _check_guest_accelerators(name: str, instance: str, machine: Machine, node_config: dict) -> list[str]:
    accelerators = node_config.get("guestAccelerators") or []
    count = sum(int(a.get("acceleratorCount", 0)) for a in accelerators)
    problems = []
    if accelerators and count != machine.num_gpus:
        problems.append(f"node type {name}: guestAccelerators attach {count} GPUs, {instance} has {machine.num_gpus}")
    for a in accelerators:
        if a.get("acceleratorType") != machine.accelerator_type:
            problems.append(
                f"node type {name}: guestAccelerators type {a.get('acceleratorType')!r} but {instance} comes with "
                f"{machine.accelerator_type!r}"
            )
    return problems


def _check_local_resources(config: dict) -> list[str]:
    """On-prem Ray has no node types (prepare_config refuses them): GPUs are declared on `ray start`."""
    problems = []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = _start_of(config, key)
        if start and _flag(start[1], "--num-gpus") is None:
            problems.append(f"{key}: `ray start` must declare --num-gpus (on-prem there are no node types)")
    return problems


def _start_of(config: dict, key: str) -> tuple[dict[str, str], list[str]] | None:
    """Environment (docker -e included) and arguments of the ``ray start`` among ``config[key]``."""
    role = "head" if key.startswith("head") else "worker"
    docker = config.get("docker") or {}
    env = docker_env([*docker.get("run_options", []), *docker.get(f"{role}_run_options", [])])
    for command in config.get(key) or []:
        found = ray_start(command)
        if found:
            return {**env, **found[0]}, found[1]
    return None


def _images(config: dict) -> list[str]:
    docker = config.get("docker") or {}
    images = [docker.get(k) for k in ("image", "head_image", "worker_image")]
    images += [(t.get("docker") or {}).get("worker_image") for t in _node_types(config).values()]
    return [i for i in dict.fromkeys(images) if i]


def _node_setups(config: dict) -> dict[str, list[tuple[str, list[str]]]]:
    """Node type -> the (YAML key, commands) it runs for setup, merged as Ray merges them."""

    def common(role: str) -> list[tuple[str, list[str]]]:
        return [("setup_commands", config.get("setup_commands") or []),
                (f"{role}_setup_commands", config.get(f"{role}_setup_commands") or [])]  # fmt: skip

    types = _node_types(config)
    if not types:  # on-prem: one head, identical workers
        return {"head": common("head"), "workers": common("worker")}
    setups = {}
    for name, node_type in types.items():
        if name == config.get("head_node_type"):
            setups[name] = common("head")
        elif (key := "worker_setup_commands") in node_type:  # replaces setup_commands + worker_setup_commands
            setups[name] = [(f"node type {name}: worker_setup_commands", node_type[key])]
        else:
            setups[name] = common("worker")
    return setups


def _by_node(messages: dict[str, str]) -> list[str]:
    """One line per distinct message, naming the node types that share it: {"a": m, "b": m} -> "node types a, b: m"."""
    names_by_message: dict[str, list[str]] = {}
    for name, message in messages.items():
        names_by_message.setdefault(message, []).append(name)
    return [
        f"node type{'s' if len(names) > 1 else ''} {', '.join(names)}: {message}"
        for message, names in names_by_message.items()
    ]


def _is_project(remote: str, config: dict, project: Project, root: Path) -> bool:
    """Whether ``remote`` (a ``pip install -e`` path) is a file_mounts copy of this project's repository."""
    mounts = {k.rstrip("/"): v for k, v in (config.get("file_mounts") or {}).items()}
    local = mounts.get(remote.rstrip("/"))
    if local is None:
        return False
    path = Path(os.path.expanduser(local))
    pyproject = (path if path.is_absolute() else root / path) / "pyproject.toml"
    if not pyproject.is_file():
        return False
    with open(pyproject, "rb") as f:
        return tomllib.load(f).get("project", {}).get("name") == project.name


def _installed(config: dict, sources: list[tuple[str, list[str]]], project: Project, root: Path) -> tuple[set, bool]:
    """(Names pip installs, whether the project itself is installed) over one node's setup commands."""
    names, has_project = set(), False
    for _, commands in sources:
        for command in commands:
            requirements, paths = pip_installs(command)
            names |= {(parse_requirement(r) or ("",))[0] for r in requirements}
            has_project |= any(_is_project(p, config, project, root) for p in paths)
    return names, has_project


def _check_install(config: dict, project: Project, root: Path) -> list[str]:
    images = _images(config)
    problems = [p for image in images for p in check_image(image, project, "docker")]
    ray_in_image = bool(images) and all(image_ray_version(i) == project.pins["ray"] for i in images)
    missing_by_node: dict[str, str] = {}
    for name, sources in _node_setups(config).items():
        for where, commands in sources:
            for command in commands:
                problems += pin_problems(where, pip_installs(command)[0], project)
        names, has_project = _installed(config, sources, project, root)
        missing = [f"{n}=={v}" for n, v in project.pins.items() if n not in names and not (n == "ray" and ray_in_image)]
        if missing and not has_project:
            missing_by_node[name] = (
                "setup installs neither the project (pip install -e of the repository synced by file_mounts) nor "
                f"these pins of pyproject.toml: {', '.join(missing)}"
            )
    return problems + _by_node(missing_by_node)


def _check_auth(config: dict) -> list[str]:
    problems = []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        if key not in config:
            problems.append(f"{key}: missing, so Ray's default starts the nodes without token auth")
            continue
        start = _start_of(config, key)
        if start is None:
            problems.append(f"{key}: no `ray start` command")
            continue
        env, args = start
        if env.get("RAY_AUTH_MODE") != "token":
            problems.append(
                f"{key}: `ray start` runs without RAY_AUTH_MODE=token (put it on the `ray start` line: each command "
                "runs in its own shell)"
            )
            if _flag(args, "--dashboard-host") == "0.0.0.0":
                problems.append(f"{key}: the dashboard listens on 0.0.0.0 without token auth")
    head = _start_of(config, "head_start_ray_commands")
    token_path = head[0].get("RAY_AUTH_TOKEN_PATH") if head else None
    remotes = [r.rstrip("/") for r in config.get("file_mounts") or {}]
    if not any(r.endswith(AUTH_TOKEN_FILE) or r == token_path for r in remotes):
        problems.append(
            "file_mounts: no ~/.ray/auth_token, so the nodes have no token (make it with "
            "`ray get-auth-token --generate`, mount it: '~/.ray/auth_token': '~/.ray/auth_token')"
        )
    return problems


def _check_storage(config: dict, project: Project, root: Path) -> list[str]:
    head = _start_of(config, "head_start_ray_commands")
    if head is None:
        return []  # reported by _check_auth
    storage = head[0].get("RETINANET_STORAGE")
    if not storage:
        return [
            "head_start_ray_commands: no RETINANET_STORAGE=s3://... (or gs://...) in the `ray start` environment: "
            "the shared storage jobs use as checkpoint.storage_path"
        ]
    if not storage.startswith(SHARED_STORAGE):
        return [
            f"head_start_ray_commands: RETINANET_STORAGE={storage} is not shared object storage; use "
            "s3://YOUR-BUCKET/runs or gs://YOUR-BUCKET/runs (every node and every restart must see the checkpoints)"
        ]
    problems = []
    if storage.startswith("s3://") and _provider(config) == "local":
        for key in ("head_start_ray_commands", "worker_start_ray_commands"):
            start = _start_of(config, key)
            if start and not ({"AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"} & start[0].keys()):
                problems.append(
                    f"{key}: s3:// storage on-prem needs AWS_ENDPOINT_URL (your S3-compatible store, e.g. MinIO) "
                    "in the `ray start` environment"
                )
    if storage.startswith("gs://"):
        message = "gs:// storage needs gcsfs in setup (not a pyproject dependency; 2026.8.2 fits s3fs's fsspec)"
        setups = _node_setups(config).items()
        problems += _by_node({n: message for n, s in setups if "gcsfs" not in _installed(config, s, project, root)[0]})
    return problems


def _check_efa(config: dict) -> list[str]:
    """p5/p4d: NCCL over EFA needs EFA interfaces, the devices in the container and libfabric's variables."""
    if _provider(config) != "aws":
        return []
    docker = config.get("docker") or {}
    start = _start_of(config, "worker_start_ray_commands")
    problems = []
    for name, node_type in _node_types(config).items():
        machine = _machine(config, node_type)
        if machine is None or not machine.efa or name == config.get("head_node_type"):
            continue
        instance = node_type["node_config"]["InstanceType"]
        options = [*docker.get("run_options", []), *docker.get("worker_run_options", []),
                   *(node_type.get("docker") or {}).get("worker_run_options", [])]  # fmt: skip
        env = {**(start[0] if start else {}), **docker_env(options)}
        missing = [f"{k}={v}" for k, v in EFA_ENV.items() if env.get(k) != v]
        if missing:
            problems.append(
                f"node type {name}: {instance} has EFA but its environment lacks {', '.join(missing)} "
                "(docker worker_run_options -e, or the `ray start` line)"
            )
        interfaces = node_type["node_config"].get("NetworkInterfaces") or []
        if not any(i.get("InterfaceType") in ("efa", "efa-only") for i in interfaces):
            problems.append(f"node type {name}: {instance} has EFA but no NetworkInterfaces with InterfaceType: efa")
        if _images(config) and not any("/dev/infiniband" in o or "--privileged" in o for o in options):
            problems.append(f"node type {name}: the EFA devices do not reach the container: --device=/dev/infiniband")
    return problems


def _check_node_identity(config: dict) -> list[str]:
    """Workers read shards and write checkpoints: they need cloud credentials for the bucket."""
    provider = _provider(config)
    key = {"aws": "IamInstanceProfile", "gcp": "serviceAccounts"}.get(provider)
    if key is None:
        return []
    return [
        f"node type {name}: no {key}, so it has no credentials for the bucket (give it one with storage access)"
        for name, node_type in _node_types(config).items()
        if name != config.get("head_node_type") and key not in node_type.get("node_config", {})
    ]


# --- entry points ----------------------------------------------------------------------------------------


def check(path: str | Path, *, root: Path = REPO_ROOT) -> list[str]:
    """All problems of one deployment file (KubeRay manifest or ``ray up`` YAML); empty means it passes."""
    if is_kuberay(path):
        return check_kuberay(path, root=root)
    problems = []
    try:
        ray_validate(path)
    except ValueError as e:
        problems.append(str(e))
    try:
        return problems + check_launcher(path, root=root)
    except (AttributeError, TypeError, KeyError) as e:  # a shape Ray's schema rejects (reported above) or allows
        return [*problems, f"our checks cannot read this config ({e!r}); fix the structure first"]


def main(argv: list[str] | None = None) -> int:
    """``python -m cluster.validate FILE...``: prints each problem as ``FILE: problem``; 1 if any, else 0."""
    ap = argparse.ArgumentParser(prog="python -m cluster.validate", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", type=Path, help="cluster YAMLs (ray up) and KubeRay manifests")
    args = ap.parse_args(argv)
    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)  # Ray logs each default it fills in
    num_failed = 0
    for path in args.paths:
        try:
            problems = check(path)
        except (ValueError, OSError) as e:
            problems = [str(e)]
        for problem in problems:
            print(f"{path}: {problem}")
        print(f"{path}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
        num_failed += bool(problems)
    return 1 if num_failed else 0


if __name__ == "__main__":
    sys.exit(main())
