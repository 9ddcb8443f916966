"""Several Ray nodes on this machine (``ray.cluster_utils.Cluster``, never ``AutoscalingCluster``): a head with
no CPUs for workers and two 1-CPU nodes, so Ray Train places one worker per node. Checkpoints go to the
S3-protocol test server, the storage every node shares."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from engine import checkpoint as ckpt
from engine.config import apply_overrides
from engine.driver import log_dir, run
from engine.recipes import get_recipe
from pipeline import storage
from pipeline.loader import open_dataset
from tests.engine.test_train import data  # noqa: F401  (fixture)

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster():
    """Yields ``(Cluster, [worker node, worker node])``; the driver joins it through RAY_ADDRESS. One cluster
    for the module (the elastic test, which removes a node, runs last)."""
    import ray
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as monkeypatch:  # undone however the fixture ends
        monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
        # A driver given 127.0.0.1 connects to this machine's external address instead, where a head bound to
        # loopback does not listen: keep loopback as it is.
        monkeypatch.setattr(ray._private.services, "resolve_ip_for_localhost", lambda host: host)
        local = {"node_ip_address": "127.0.0.1"}
        c = Cluster(initialize_head=True, head_node_args={**local, "num_cpus": 0, "dashboard_host": "127.0.0.1"})
        nodes = [c.add_node(**local, num_cpus=1) for _ in range(2)]
        c.wait_for_nodes()
        monkeypatch.setenv("RAY_ADDRESS", c.address)
        try:
            yield c, nodes
        finally:
            ray.shutdown()
            c.shutdown()  # removes only the nodes this cluster started


def _cfg(data: dict, storage_path: str, name: str, *extra: str):  # noqa: F811
    return apply_overrides(
        get_recipe("tiny_cpu"),
        [f"data.train_uri={data['train']}", f"data.val_uri={data['val']}", f"checkpoint.storage_path={storage_path}",
         f"checkpoint.name={name}", "eval.at_end=false", "eval.every=0", "log.every=5", *extra],
    )  # fmt: skip


def _events(cfg, name: str) -> list[dict]:
    records = [json.loads(line) for line in (log_dir(cfg) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("event") == name]


def test_one_worker_per_node_reads_disjoint_shards_and_checkpoints_to_s3(data, cluster, s3_bucket, tmp_path) -> None:  # noqa: F811
    _, nodes = cluster
    with pytest.raises(
        ValueError, match=r"is a local folder, but this Ray cluster has 3 nodes: set checkpoint\.storage_path=s3://"
    ):
        run(_cfg(data, str(tmp_path / "runs"), "local-on-a-cluster"))
    cfg = _cfg(data, f"{s3_bucket}/runs", f"multinode-{time.time_ns()}", "optim.max_iters=10", "optim.steps=[8]",
               "checkpoint.every=5")  # fmt: skip
    try:
        result = run(cfg)
        assert result.error is None and result.metrics["step"] == 10
        (layout,) = _events(cfg, "workers")
        ranks = layout["ranks"]
        assert layout["world_size"] == 2 and [r["rank"] for r in ranks] == [0, 1]
        assert {r["node"] for r in ranks} == {n.node_id for n in nodes}  # one rank on each worker node
        first, second = (set(r["shards"]) for r in ranks)
        assert first and second and not first & second
        assert first | second == set(open_dataset(data["train"]).shards)
        run_uri = f"{s3_bucket}/runs/{cfg.checkpoint.name}"
        saved = storage.list_matching(run_uri, "checkpoint_0*")
        assert [s.rsplit("/", 1)[-1] for s in saved] == [ckpt.checkpoint_name(5), ckpt.checkpoint_name(10)]
        assert storage.exists(f"{saved[-1]}/{ckpt.MODEL}")
        # rank 0 ran on a worker node: its progress files are published beside the checkpoints
        published = storage.read_bytes(f"{run_uri}/logs/metrics.jsonl").decode().splitlines()
        assert json.loads(published[-1])["step"] == 10
        assert storage.list_matching(f"{run_uri}/logs/tensorboard", "events.out.tfevents.*")
    finally:
        _remove_local_logs(cfg)


def test_a_removed_node_shrinks_the_run_which_resumes_and_completes(data, cluster, s3_bucket) -> None:  # noqa: F811
    """Elastic ``scaling.min_workers=1``: when a node goes, Ray Train restarts the group with the workers
    that fit (one), from the latest checkpoint, and the run completes its planned steps."""
    c, nodes = cluster
    name = f"elastic-{time.time_ns()}"
    cfg = _cfg(data, f"{s3_bucket}/runs", name, "optim.max_iters=16", "optim.steps=[12]", "checkpoint.every=4",
               "scaling.min_workers=1", "checkpoint.max_failures=2")  # fmt: skip
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=run(cfg)), daemon=True)
    try:
        thread.start()
        snapshot = f"{s3_bucket}/runs/{name}/checkpoint_manager_snapshot.json"
        deadline = time.time() + 600
        while time.time() < deadline and thread.is_alive():  # a registered checkpoint at step 8 or later
            if storage.exists(snapshot):
                latest = json.loads(storage.read_bytes(snapshot)).get("latest_checkpoint_result") or {}
                if latest.get("checkpoint_dir_name", "") >= ckpt.checkpoint_name(8):
                    break
            time.sleep(0.5)
        c.remove_node(nodes[1])
        thread.join(timeout=900)
        assert not thread.is_alive(), "the run did not finish after the node was removed"
        result = outcome["result"]
        assert result.error is None and result.metrics["step"] == 16
        resumed = [e["step"] for e in _events(cfg, "resumed")]
        assert resumed and 8 <= resumed[-1] < 16
        layouts = _events(cfg, "workers")
        assert layouts[0]["world_size"] == 2 and layouts[-1]["world_size"] == 1
        assert [r["node"] for r in layouts[-1]["ranks"]] == [nodes[0].node_id]
        assert storage.exists(f"{s3_bucket}/runs/{name}/{ckpt.checkpoint_name(16)}/{ckpt.MODEL}")
    finally:
        thread.join(timeout=1)
        _remove_local_logs(cfg)


def _remove_local_logs(cfg) -> None:
    """Runs stored in S3 keep their progress files under ./runs/NAME on the driver: remove this test's."""
    import shutil

    path = Path(log_dir(cfg))
    if path.exists() and path.name.startswith(("multinode-", "elastic-")):
        shutil.rmtree(path)
