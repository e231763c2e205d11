"""Ray Tune on a real multi-node Ray cluster (two nodes on this machine): a search survives losing a node.

A head node and a worker node (``ray.cluster_utils.Cluster``: separate raylets, object stores and
worker processes, one CPU each) run a 2-trial grid attached through ``address=``, with the experiment
on a storage path both nodes see (on a real cluster: NFS or s3://). When the trial on the worker node
has reported (and checkpointed) an epoch, the worker node is killed: its trial fails with the node, is
retried from its last checkpoint on the surviving head node, and the search finishes.
"""
import threading
import time

import pytest
from conftest import write_tiny_dataset
from test_tune import tiny_fixed, write_space

from recbole_fmrl.tune import search as tune_search
from recbole_fmrl.tune import space as tune_space

EPOCHS = 8
USERS = 1000  # epochs of ~1 s: the worker node is removed while its trial is mid-schedule
# faster node-failure detection than Ray's default (~30 s), but tolerant enough (10 missed checks of 1 s)
# that a node of a loaded 2-core machine is not declared dead: that takes the head node and the test
# process (Ray's driver) down with it
FAST_FAILURE = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                "health_check_failure_threshold": 10}


def _progress(trial_dir):
    import pandas as pd

    path = trial_dir / "progress.csv"
    try:
        return pd.read_csv(path) if path.is_file() and path.stat().st_size else None
    except (pd.errors.EmptyDataError, pd.errors.ParserError):
        return None  # being written


def _kill_when_worker_trial_checkpointed(cluster, worker, worker_id, exp_dir, killed, deadline):
    """Background: once a trial on the worker node reported an epoch (with its checkpoint), remove the node."""
    while time.time() < deadline:
        for trial_dir in exp_dir.glob("trial_*"):
            history = _progress(trial_dir)
            if history is None or "node_id" not in history:
                continue
            on_worker = history[history["node_id"] == worker_id]
            if len(on_worker) and on_worker["epoch"].max() >= 1 and on_worker["finished"].isna().all():
                killed.update(trial=trial_dir.name, epoch=int(on_worker["epoch"].max()))
                cluster.remove_node(worker, allow_graceful=False)
                return
        time.sleep(0.2)


@pytest.fixture
def two_node_cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": FAST_FAILURE})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)  # only to learn the nodes' ids: run_search attaches by itself
    node_ids = {n["ObjectStoreSocketName"]: n["NodeID"] for n in ray.nodes()}
    ray.shutdown()
    yield cluster, worker, {"head": node_ids[cluster.head_node.plasma_store_socket_name],
                            "worker": node_ids[worker.plasma_store_socket_name]}
    ray.shutdown()
    cluster.shutdown()


def test_search_on_two_nodes_survives_losing_one(two_node_cluster, tmp_path):
    cluster, worker, ids = two_node_cluster
    write_tiny_dataset(tmp_path / "data", n_users=USERS, n_items=200)
    fixed = {**tiny_fixed(tmp_path / "data", tmp_path, "learning_rate"), "epochs": EPOCHS, "stopping_step": EPOCHS,
             "eval_batch_size": 256}
    space = write_space(tmp_path / "space.yaml", fixed, {"learning_rate": [0.003, 0.01]})
    shared = tmp_path / "shared"  # both nodes' view of the experiment (NFS / s3:// on real machines)
    job = tune_space.build_job(str(space), "tiny", storage_path=str(shared), name="two-nodes", max_failures=2,
                               cpus_per_trial=1)
    killed = {}
    killer = threading.Thread(target=_kill_when_worker_trial_checkpointed,
                              args=(cluster, worker, ids["worker"], shared / "two-nodes", killed, time.time() + 240),
                              daemon=True)
    killer.start()
    summary = tune_search.run_search(job, address=cluster.address, verbose=0, evaluate_test=True)
    killer.join(timeout=1)

    assert killed, "the worker node was never removed while its trial ran"
    rows = summary["rows"]
    assert [r["status"] for r in rows] == ["TERMINATED", "TERMINATED"]
    assert all(r["end"] == "max_epochs" for r in rows)
    assert summary["selected"] is not None and "ndcg@10" in summary["selected"]["test"]
    lost = _progress(shared / "two-nodes" / killed["trial"])
    before = lost[lost["node_id"] == ids["worker"]]["epoch"].tolist()
    after = lost[lost["node_id"] == ids["head"]]["epoch"].tolist()
    assert before[:2] == [0, 1] and killed["epoch"] in before
    # retried on the surviving node from its last checkpoint: it goes on after an epoch the lost node
    # had checkpointed (not from scratch) and ends the schedule there
    assert after and after[0] > 0 and after[0] - 1 in before
    assert after == list(range(after[0], EPOCHS))
