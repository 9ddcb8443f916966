"""The deployment files in cluster/ pass Ray's offline validation and our checks, and each check catches a
realistic mistake: a copy of a shipped file with one thing broken, and the exact problem reported.

Nothing here starts Ray or opens a connection (the offline test refuses sockets to prove it).
"""

from __future__ import annotations

import copy
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster import kuberay_check, validate
from cluster.project import read_project

CLUSTER = Path(validate.__file__).parent
LAUNCHERS = ["aws.yaml", "gcp.yaml", "local.yaml"]


def load(name: str) -> dict:
    return validate.load_yaml(CLUSTER / name)


def load_kuberay() -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / "kuberay.yaml").read_text()) if d]


def problems(config: dict) -> list[str]:
    return validate.launcher_problems(config)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to resolve or connect fails the test: Ray's validation must be offline."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"tried to reach the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# --- the shipped files pass ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_passes_ray_validation_offline(name: str, no_network: None) -> None:
    prepared = validate.ray_validate(CLUSTER / name)
    assert prepared["head_node_type"] in prepared["available_node_types"]
    assert prepared["max_workers"] >= 1


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_passes_our_checks(name: str) -> None:
    assert validate.check_launcher(CLUSTER / name) == []


def test_kuberay_passes_our_checks() -> None:
    assert kuberay_check.check_kuberay(CLUSTER / "kuberay.yaml") == []
    kinds = [d["kind"] for d in load_kuberay()]
    assert kinds == ["ServiceAccount", "RayCluster", "RayJob"]


# --- Ray's own validation rejects broken structure ------------------------------------------------------


def test_ray_rejects_a_misspelt_top_level_key() -> None:
    # Without the schema, Ray would fill in defaults.yaml's head start commands: no token auth, no storage.
    config = load("aws.yaml")
    config["head_start_commands"] = config.pop("head_start_ray_commands")
    with pytest.raises(ValueError) as e:
        validate.ray_validate(config)
    assert (
        str(e.value)
        == "Ray rejects the config: Additional properties are not allowed ('head_start_commands' was unexpected)"
    )


def test_ray_rejects_a_fractional_gpu_resource() -> None:
    config = load("aws.yaml")
    config["available_node_types"]["gpu_1x_l40s_spot"]["resources"]["GPU"] = 0.5
    with pytest.raises(ValueError) as e:
        validate.ray_validate(config)
    assert str(e.value) == (
        "Ray rejects the config: available_node_types.gpu_1x_l40s_spot.resources.GPU: 0.5 is not of type 'integer'"
    )


def test_ray_rejects_node_types_on_prem() -> None:
    # Why local.yaml declares GPUs with `ray start --num-gpus` instead of per node type.
    config = load("local.yaml")
    config["available_node_types"] = {"gpu": {"resources": {"GPU": 8}, "node_config": {}}}
    with pytest.raises(ValueError) as e:
        validate.ray_validate(config)
    assert (
        str(e.value)
        == "Ray rejects the config: The field available_node_types is not supported for on-premise clusters."
    )


# --- our launcher checks, one realistic mistake each ---------------------------------------------------


def test_gpu_count_must_match_the_instance() -> None:
    config = load("aws.yaml")
    config["available_node_types"]["gpu_8x_h100"]["resources"]["GPU"] = 4
    assert problems(config) == ["node type gpu_8x_h100: p5.48xlarge has 8 H100 GPUs but resources declare GPU: 4"]


def test_unknown_instance_type_lists_the_known_ones() -> None:
    config = load("aws.yaml")
    config["available_node_types"]["gpu_8x_a100"]["node_config"]["InstanceType"] = "p4.24xlarge"
    [problem] = problems(config)
    assert problem.startswith("node type gpu_8x_a100: unknown InstanceType 'p4.24xlarge'; known: g5.12xlarge, ")
    assert "p4d.24xlarge" in problem


def test_gcp_guest_accelerators_must_match_the_machine() -> None:
    config = load("gcp.yaml")
    # A3 comes with its GPUs; listing them anyway must at least agree with the machine.
    node_config = config["available_node_types"]["gpu_8x_h100"]["node_config"]
    node_config["guestAccelerators"] = [{"acceleratorType": "nvidia-tesla-a100", "acceleratorCount": 4}]
    assert problems(config) == [
        "node type gpu_8x_h100: guestAccelerators attach 4 GPUs, a3-highgpu-8g has 8",
        "node type gpu_8x_h100: guestAccelerators type 'nvidia-tesla-a100' but a3-highgpu-8g comes with "
        "'nvidia-h100-80gb'",
    ]


def test_on_prem_workers_must_declare_their_gpus() -> None:
    config = load("local.yaml")
    config["worker_start_ray_commands"][1] = config["worker_start_ray_commands"][1].replace(" --num-gpus=8", "")
    assert problems(config) == [
        "worker_start_ray_commands: `ray start` must declare --num-gpus (on-prem there are no node types)"
    ]


AUTH_MISSING = (
    "worker_start_ray_commands: `ray start` runs without RAY_AUTH_MODE=token (put it on the `ray start` line: "
    "each command runs in its own shell)"
)


@pytest.mark.parametrize(
    "commands",
    [
        ["ray stop", "ray start --address=$RAY_HEAD_IP:6379"],
        # Exported in a command of its own: that shell exits before `ray start` runs.
        ["ray stop", "export RAY_AUTH_MODE=token", "ray start --address=$RAY_HEAD_IP:6379"],
        # A shell variable, not exported: `ray start` does not see it.
        ["ray stop", "RAY_AUTH_MODE=token; ray start --address=$RAY_HEAD_IP:6379"],
    ],
)
def test_worker_start_must_carry_token_auth(commands: list[str]) -> None:
    config = load("aws.yaml")
    config["worker_start_ray_commands"] = commands
    assert problems(config) == [AUTH_MISSING]


def test_public_dashboard_without_auth_and_a_missing_token_file() -> None:
    config = load("gcp.yaml")
    config["head_start_ray_commands"][1] = config["head_start_ray_commands"][1].replace("RAY_AUTH_MODE=token ", "")
    del config["file_mounts"]["~/.ray/auth_token"]
    assert problems(config) == [
        "head_start_ray_commands: `ray start` runs without RAY_AUTH_MODE=token (put it on the `ray start` line: "
        "each command runs in its own shell)",
        "head_start_ray_commands: the dashboard listens on 0.0.0.0 without token auth",
        "file_mounts: no ~/.ray/auth_token, so the nodes have no token (make it with `ray get-auth-token "
        "--generate`, mount it: '~/.ray/auth_token': '~/.ray/auth_token')",
    ]


def test_storage_must_be_shared_object_storage() -> None:
    config = load("aws.yaml")
    config["head_start_ray_commands"][1] = config["head_start_ray_commands"][1].replace(
        "s3://YOUR-BUCKET/runs", "/home/ray/runs"
    )
    assert problems(config) == [
        "head_start_ray_commands: RETINANET_STORAGE=/home/ray/runs is not shared object storage; use "
        "s3://YOUR-BUCKET/runs or gs://YOUR-BUCKET/runs (every node and every restart must see the checkpoints)"
    ]


def test_on_prem_s3_needs_an_endpoint_on_the_workers() -> None:
    config = load("local.yaml")
    config["worker_start_ray_commands"][1] = config["worker_start_ray_commands"][1].replace(
        " AWS_ENDPOINT_URL=http://10.0.0.10:9000", ""
    )
    assert problems(config) == [
        "worker_start_ray_commands: s3:// storage on-prem needs AWS_ENDPOINT_URL (your S3-compatible store, "
        "e.g. MinIO) in the `ray start` environment"
    ]


def test_gs_storage_needs_gcsfs_on_every_node() -> None:
    config = load("gcp.yaml")
    config["setup_commands"][0] = "pip install --no-cache-dir -e /home/ray/retinanet"
    assert problems(config) == [
        "node types head, gpu_8x_h100, gpu_8x_h100_spot, gpu_1x_l4_spot: gs:// storage needs gcsfs in setup "
        "(not a pyproject dependency; 2026.8.2 fits s3fs's fsspec)"
    ]


def test_docker_image_must_have_the_pinned_ray() -> None:
    config = load("aws.yaml")
    config["docker"]["image"] = "rayproject/ray:2.52.0-py311-gpu"
    assert problems(config) == [
        "docker: image rayproject/ray:2.52.0-py311-gpu has Ray 2.52.0 but pyproject.toml pins ray==2.60.0"
    ]


def test_setup_pin_must_equal_pyproject() -> None:
    config = load("aws.yaml")
    config["setup_commands"].append("pip install torch==2.5.0")
    assert problems(config) == ["setup_commands: installs torch==2.5.0 but pyproject.toml pins torch==2.14.1"]


def test_node_type_setup_that_skips_the_project() -> None:
    # A node type's own worker_setup_commands replaces setup_commands: the project is no longer installed.
    config = load("aws.yaml")
    config["available_node_types"]["gpu_8x_a100"]["worker_setup_commands"] = ["pip install torch==2.14.1"]
    pins = read_project().pins
    missing = ", ".join(f"{n}=={v}" for n, v in pins.items() if n not in ("torch", "ray"))
    assert problems(config) == [
        "node type gpu_8x_a100: setup installs neither the project (pip install -e of the repository synced by "
        f"file_mounts) nor these pins of pyproject.toml: {missing}"
    ]


def test_explicit_pins_instead_of_the_project_pass() -> None:
    config = load("aws.yaml")
    pins = read_project().pins
    config["setup_commands"][0] = "pip install " + " ".join(f"{n}=={v}" for n, v in pins.items() if n != "ray")
    assert problems(config) == []


def test_efa_instance_without_efa_wiring() -> None:
    config = load("aws.yaml")
    del config["available_node_types"]["gpu_8x_a100"]["docker"]
    del config["available_node_types"]["gpu_8x_a100"]["node_config"]["NetworkInterfaces"]
    assert problems(config) == [
        "node type gpu_8x_a100: p4d.24xlarge has EFA but its environment lacks FI_PROVIDER=efa, "
        "FI_EFA_USE_DEVICE_RDMA=1 (docker worker_run_options -e, or the `ray start` line)",
        "node type gpu_8x_a100: p4d.24xlarge has EFA but no NetworkInterfaces with InterfaceType: efa",
        "node type gpu_8x_a100: the EFA devices do not reach the container: --device=/dev/infiniband",
    ]


def test_worker_without_bucket_credentials() -> None:
    config = load("aws.yaml")
    del config["available_node_types"]["gpu_1x_l40s_spot"]["node_config"]["IamInstanceProfile"]
    assert problems(config) == [
        "node type gpu_1x_l40s_spot: no IamInstanceProfile, so it has no credentials for the bucket (give it one "
        "with storage access)"
    ]


# --- KubeRay manifest ---------------------------------------------------------------------------------


def kuberay_with(change: str) -> list[str]:
    """Problems of kuberay.yaml after one named edit of its RayCluster or RayJob."""
    docs = copy.deepcopy(load_kuberay())
    cluster, job = docs[1]["spec"], docs[2]["spec"]
    group = cluster["workerGroupSpecs"][0]
    pod = group["template"]["spec"]
    if change == "no auth":
        del cluster["authOptions"]
    elif change == "no /tmp/ray":
        pod["containers"][0]["volumeMounts"] = [
            m for m in pod["containers"][0]["volumeMounts"] if m["name"] != "ray-logs"
        ]
    elif change == "num-gpus 4":
        group["rayStartParams"]["num-gpus"] = "4"
    elif change == "short grace":
        del pod["terminationGracePeriodSeconds"]
    elif change == "old ray":
        cluster["rayVersion"] = "2.52.0"
    elif change == "local storage":
        job["entrypoint"] = job["entrypoint"].replace("s3://YOUR-BUCKET/runs", "/tmp/runs")
    elif change == "no cluster":
        del job["clusterSelector"]
    elif change == "torch pin":
        job["runtimeEnvYAML"] = job["runtimeEnvYAML"].replace("torch==2.14.1", "torch==2.5.0")
    return kuberay_check.kuberay_problems(docs)


GROUP = "RayCluster retinanet workerGroupSpec gpu-8x"
JOB = "RayJob retinanet-coco-r50-1x"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            "no auth",
            "RayCluster retinanet: token authentication is off: set spec.authOptions.mode: token (KubeRay >= 1.5.1)",
        ),
        (
            "no /tmp/ray",
            f"{GROUP}: no volumeMount at /tmp/ray (an emptyDir for Ray's logs, as the KubeRay docs advise)",
        ),
        ("num-gpus 4", f"{GROUP}: nvidia.com/gpu limit 8 but rayStartParams num-gpus 4"),
        ("short grace", f"{GROUP}: terminationGracePeriodSeconds 30 is under 120: too short for a checkpoint upload"),
        ("old ray", "RayCluster retinanet: spec.rayVersion '2.52.0' but pyproject.toml pins ray==2.60.0"),
        ("local storage", f"{JOB}: checkpoint.storage_path /tmp/runs is not shared object storage; use s3:// or gs://"),
        ("no cluster", f"{JOB}: needs spec.clusterSelector (ray.io/cluster: <RayCluster>) or spec.rayClusterSpec"),
        ("torch pin", f"{JOB} runtimeEnvYAML: installs torch==2.5.0 but pyproject.toml pins torch==2.14.1"),
    ],
)
def test_kuberay_catches(change: str, expected: str) -> None:
    assert kuberay_with(change) == [expected]


# --- the command line -----------------------------------------------------------------------------------


def run_cli(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster.validate", *map(str, paths)],
        cwd=CLUSTER.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_passes_the_shipped_files_and_fails_a_broken_copy(tmp_path: Path) -> None:
    shipped = sorted(CLUSTER.glob("*.yaml"))
    assert [p.name for p in shipped] == ["aws.yaml", "gcp.yaml", "kuberay.yaml", "local.yaml"]
    ok = run_cli(*shipped)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.count(": ok\n") == 4

    config = load("aws.yaml")
    config["available_node_types"]["gpu_8x_h100"]["resources"]["GPU"] = 4
    config["max_worker"] = 4  # a typo Ray's schema catches
    broken = tmp_path / "aws.yaml"
    broken.write_text(yaml.safe_dump(config))
    bad = run_cli(broken)
    assert bad.returncode == 1
    assert bad.stdout.splitlines() == [
        f"{broken}: Ray rejects the config: Additional properties are not allowed ('max_worker' was unexpected)",
        f"{broken}: node type gpu_8x_h100: p5.48xlarge has 8 H100 GPUs but resources declare GPU: 4",
        f"{broken}: 2 problem(s)",
    ]
