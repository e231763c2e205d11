"""Ray Tune on a real multi-node Ray cluster (two nodes on this machine): a search survives losing a node.

A head node and a worker node (``ray.cluster_utils.Cluster``: separate raylets, object stores and
worker processes, one CPU each) run a 2-trial grid attached through ``address=``, with the experiment
on a storage path both nodes see (on a real cluster: NFS or s3://). When the trial on the worker node
has reported (and checkpointed) an epoch, the worker node is killed: its trial fails with the node, is
retried from its last checkpoint on the surviving head node, and the search finishes. The cluster runs
with Ray's token authentication on (``RAY_AUTH_MODE=token``, the token in a file every node and the
driver read through ``RAY_AUTH_TOKEN_PATH``); a driver holding another token is refused.

The scenario runs in its own Python process: Ray's driver state is process-wide (the search tests in
test_tune.py start and stop their own local Ray), and a driver whose node is lost exits its process.
"""
import contextlib
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

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


@contextlib.contextmanager
def two_node_cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": FAST_FAILURE})
    try:
        # The driver attaches while the head is the only node: with two raylets on one host Ray may attach
        # it to either, and removing the driver's own node would end this process. run_search reuses
        # this session (it attaches by itself only when no session is running).
        ray.init(address=cluster.address)
        worker = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        node_ids = {n["ObjectStoreSocketName"]: n["NodeID"] for n in ray.nodes()}
        yield cluster, worker, {"head": node_ids[cluster.head_node.plasma_store_socket_name],
                                "worker": node_ids[worker.plasma_store_socket_name]}
    finally:
        ray.shutdown()
        cluster.shutdown()


def run_scenario(tmp_path):
    """The 2-node search with the worker node killed mid-run; what the test checks, as plain values."""
    with two_node_cluster() as (cluster, worker, ids):
        write_tiny_dataset(tmp_path / "data", n_users=USERS, n_items=200)
        fixed = {**tiny_fixed(tmp_path / "data", tmp_path, "learning_rate"), "epochs": EPOCHS,
                 "stopping_step": EPOCHS, "eval_batch_size": 256}
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
        refused = _refused_without_the_token(cluster.address)
    out = {"refused": refused, "killed": killed, "status": [r["status"] for r in summary["rows"]], "end": [r["end"] for r in summary["rows"]],
           "selected_test": sorted((summary["selected"] or {}).get("test", {}))}
    if killed:
        lost = _progress(shared / "two-nodes" / killed["trial"])
        out["before"] = [int(e) for e in lost[lost["node_id"] == ids["worker"]]["epoch"]]
        out["after"] = [int(e) for e in lost[lost["node_id"] == ids["head"]]["epoch"]]
    return out


def _token_env(token_file):
    """The environment of a process that authenticates with the token in ``token_file`` (Ray >= 2.50)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    return {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}


def _refused_without_the_token(address):
    """A driver holding another token cannot attach to the cluster (token authentication is on)."""
    code = "import ray, sys; ray.init(address=sys.argv[1]); print('attached')"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")},
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    done = subprocess.run([sys.executable, "-c", code, address], env=env, capture_output=True, text=True, timeout=180)
    return done.returncode != 0 and "attached" not in done.stdout


def test_search_on_two_nodes_survives_losing_one(tmp_path):
    here = Path(__file__).resolve().parent
    token = tmp_path / "auth_token"  # the cluster's token, as a worker node would get it (docs/tuning.md)
    token.write_text(secrets.token_hex(32))
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(tmp_path), str(tmp_path / "out.json")],
                          cwd=here, env={**_token_env(token), "PYTHONPATH": str(here)}, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["refused"], "a driver with another token attached: token authentication is off"
    assert result["killed"], "the worker node was never removed while its trial ran"
    assert result["status"] == ["TERMINATED", "TERMINATED"]
    assert all(end == "max_epochs" for end in result["end"])
    assert "ndcg@10" in result["selected_test"]
    before, after, epoch = result["before"], result["after"], result["killed"]["epoch"]
    assert before[:2] == [0, 1] and epoch in before
    # retried on the surviving node from its last checkpoint: it goes on after an epoch the lost node
    # had checkpointed (not from scratch) and ends the schedule there
    assert after and after[0] > 0 and after[0] - 1 in before
    assert after == list(range(after[0], EPOCHS))


if __name__ == "__main__":  # the scenario's own process (see the module docstring)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    Path(sys.argv[2]).write_text(json.dumps(run_scenario(Path(sys.argv[1]))))
