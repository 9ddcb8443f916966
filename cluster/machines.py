"""Published specs of the cloud machine types the cluster YAMLs use: GPUs, vCPUs, GCP accelerator name, EFA.

:mod:`cluster.validate` checks each node type's declared resources against this table. Extend it when a YAML
uses another type: an unknown type is reported as a problem rather than guessed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Machine:
    """What a cloud machine type brings: GPU model and count, vCPUs, its GCP accelerator name, EFA."""

    gpu: str  # "" for CPU-only types
    num_gpus: int
    num_cpus: int
    accelerator_type: str = ""  # GCP guestAccelerators acceleratorType
    efa: bool = False


def _gcp(gpu: str, num_gpus: int, num_cpus: int, accelerator_type: str) -> Machine:
    return Machine(gpu, num_gpus, num_cpus, accelerator_type)


MACHINES: dict[str, dict[str, Machine]] = {
    "aws": {
        "m7i.2xlarge": Machine("", 0, 8),
        "m7i.4xlarge": Machine("", 0, 16),
        "m7i.8xlarge": Machine("", 0, 32),
        "m5.4xlarge": Machine("", 0, 16),
        "p5.48xlarge": Machine("H100", 8, 192, efa=True),
        "p5e.48xlarge": Machine("H200", 8, 192, efa=True),
        "p5en.48xlarge": Machine("H200", 8, 192, efa=True),
        "p4d.24xlarge": Machine("A100", 8, 96, efa=True),
        "p4de.24xlarge": Machine("A100-80GB", 8, 96, efa=True),
        "g6e.xlarge": Machine("L40S", 1, 4),
        "g6e.2xlarge": Machine("L40S", 1, 8),
        "g6e.4xlarge": Machine("L40S", 1, 16),
        "g6e.12xlarge": Machine("L40S", 4, 48),
        "g5.xlarge": Machine("A10G", 1, 4),
        "g5.2xlarge": Machine("A10G", 1, 8),
        "g5.12xlarge": Machine("A10G", 4, 48),
        "g6.xlarge": Machine("L4", 1, 4),
        "g6.2xlarge": Machine("L4", 1, 8),
    },
    "gcp": {
        "n2-standard-8": Machine("", 0, 8),
        "n2-standard-16": Machine("", 0, 16),
        "n2-standard-32": Machine("", 0, 32),
        "a3-highgpu-8g": _gcp("H100", 8, 208, "nvidia-h100-80gb"),
        "a3-megagpu-8g": _gcp("H100", 8, 208, "nvidia-h100-mega-80gb"),
        "a2-highgpu-1g": _gcp("A100", 1, 12, "nvidia-tesla-a100"),
        "a2-highgpu-8g": _gcp("A100", 8, 96, "nvidia-tesla-a100"),
        "a2-ultragpu-8g": _gcp("A100-80GB", 8, 96, "nvidia-a100-80gb"),
        "g2-standard-4": _gcp("L4", 1, 4, "nvidia-l4"),
        "g2-standard-8": _gcp("L4", 1, 8, "nvidia-l4"),
        "g2-standard-48": _gcp("L4", 4, 48, "nvidia-l4"),
    },
}
INSTANCE_KEY = {"aws": "InstanceType", "gcp": "machineType"}  # the node_config key naming the machine type
