"""The HTTP server: equal to the Python API, batched == unbatched, sessions == recommend over the history,
every bad request a 4xx naming its field, hot swap under load with no failed request, a real uvicorn
process that reloads on SIGHUP and finishes in-flight requests on SIGTERM."""
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from conftest import write_tiny_dataset
from fastapi.testclient import TestClient

from recbole_fmrl.deploy import Recommender
from recbole_fmrl.deploy.export import export_sizes
from recbole_fmrl.serve.app import ServeOptions, create_app
from recbole_fmrl.serve.batcher import Batcher
from recbole_fmrl.serve.engine import Engine, Query
from recbole_fmrl.train.driver import run

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ("127.0.0.1", 50000)
HISTORIES = [["105", "106", "107"], ["110"], ["101", "102", "103", "104", "105", "106", "107", "108"]]


def trained_artifact(root, seed):
    """Exported sizes 8 and 16 of a one-epoch FMRLRec on the tiny dataset (ID items, 30 items, window 6)."""
    write_tiny_dataset(root / "data", "tiny", with_image=False)
    cfg = {"data_path": str(root / "data"), "fmrl_output_dir": str(root / "runs"), "fmrl_cache_dir": str(root / "cache"),
           "hidden_size": 16, "fmrl_sizes": [8, 16], "epochs": 1, "train_batch_size": 16, "eval_batch_size": 64,
           "show_progress": False, "use_gpu": False, "state": "ERROR", "topk": [5, 10], "MAX_ITEM_LIST_LENGTH": 6,
           "seed": seed, "fmrl_modality": "id", "n_layers": 2}
    result = run("FMRLRec", "tiny", config_dict=cfg, log=False)
    export_sizes(result["saved_model_file"], [8, 16], root / "art", onnx=False)
    return root / "art"


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    """Two artifacts of the same dataset, trained with different seeds (for hot swaps)."""
    return [trained_artifact(tmp_path_factory.mktemp(f"serve{seed}"), seed) for seed in (7, 8)]


@pytest.fixture
def client(arts):
    with TestClient(create_app(Engine(arts[0])), client=LOCAL) as c:
        yield c


def same(got, want):
    """Equal rankings, scores equal to float rounding (a batch pads histories to its longest)."""
    assert [r["items"] for r in got] == [r["items"] for r in want]
    assert [r["skipped"] for r in got] == [r["skipped"] for r in want]
    for g, w in zip(got, want):
        assert torch.allclose(torch.tensor(g["scores"]), torch.tensor(w["scores"]), atol=1e-5)


@pytest.mark.parametrize("params", [{}, {"k": 3, "size": 8}, {"k": 5, "exclude_seen": True},
                                    {"k": 4, "funnel": "8:12,16"}, {"k": 5, "context": "full"},
                                    {"k": 2, "size": 8, "exclude_seen": True, "context": "full"}])
def test_recommend_equals_the_python_api(arts, client, params):
    response = client.post("/recommend", json={"histories": HISTORIES, **params})
    assert response.status_code == 200
    rec = Recommender.load(arts[0], size=params.get("size"))
    kwargs = {key: value for key, value in params.items() if key != "size"}
    same(response.json()["results"], rec.recommend(HISTORIES, **kwargs))


def test_unknown_ids_are_skipped_and_counted_when_asked(arts, client):
    body = {"history": ["105", "nope", "106"], "k": 3, "skip_unknown": True}
    got = client.post("/recommend", json=body).json()["results"]
    same(got, Recommender.load(arts[0]).recommend([["105", "nope", "106"]], k=3, skip_unknown=True))
    assert got[0]["skipped"] == 1


def test_a_batch_answers_each_query_as_if_it_were_alone(arts):
    engine = Engine(arts[0])
    queries = [Query((tuple(h),), k=k, size=size, exclude_seen=ex, context=ctx)
               for h in HISTORIES for k, size, ex, ctx in ((3, None, False, "window"), (5, 8, True, "full"), (2, 16, True, "window"))]
    together = engine.run_batch(queries)
    for query, result in zip(queries, together):
        same(result, engine.run_batch([query])[0])


def test_concurrent_requests_are_coalesced_and_equal_unbatched(arts):
    engine = Engine(arts[0])
    calls = []

    def run_batch(queries):
        calls.append(len(queries))
        return engine.run_batch(queries)

    async def main():
        batcher = Batcher(run_batch, max_batch=8, max_wait_ms=50)
        batcher.start()
        queries = [Query((tuple(HISTORIES[i % 3]),), k=1 + i % 4) for i in range(20)]
        results = await asyncio.gather(*(batcher.submit(q) for q in queries))
        await batcher.stop()
        return queries, results

    queries, results = asyncio.run(main())
    assert sum(calls) == 20 and len(calls) < 20 and max(calls) <= 8  # coalesced, never above max_batch
    for query, result in zip(queries, results):
        same(result, engine.run_batch([query])[0])


@pytest.mark.parametrize("context", ["full", "window"])
def test_session_events_equal_recommend_over_the_history(arts, client, context):
    rec = Recommender.load(arts[0])
    events = ["101", "102", "103", "104", "105", "106", "107", "108", "109"]  # past the window of 6
    seen = []
    for chunk in (events[:1], events[1:5], events[5:]):
        seen += chunk
        got = client.post(f"/sessions/u-{context}/events", json={"events": chunk, "k": 5, "exclude_seen": True,
                                                                 "context": context})
        assert got.status_code == 200 and got.json()["events"] == len(seen)
        same([got.json()], rec.recommend([seen], k=5, exclude_seen=True, context=context))
    assert client.delete(f"/sessions/u-{context}").json() == {"session": f"u-{context}", "deleted": True}
    assert client.delete(f"/sessions/u-{context}").status_code == 404


def test_sessions_are_bounded_by_count_and_idle_time(arts):
    now = [0.0]
    engine = Engine(arts[0], max_sessions=2, session_ttl=10, clock=lambda: now[0])
    with TestClient(create_app(engine), client=LOCAL) as c:
        for sid in ("a", "b"):
            assert c.post(f"/sessions/{sid}/events", json={"events": ["105"]}).status_code == 200
        full = c.post("/sessions/c/events", json={"events": ["105"]})
        assert full.status_code == 429 and full.json()["field"] == "session" and "--max-sessions 2" in full.json()["error"]
        now[0] = 11.0  # a and b idle past the TTL: evicted, counted, and c fits
        assert c.post("/sessions/c/events", json={"events": ["105"]}).status_code == 200
        metrics = c.get("/metrics").text
        assert "fmrl_session_evictions_total 2" in metrics and "fmrl_sessions 1" in metrics


BAD = [  # (body, status, field): every class of bad request, with the field the error names
    (b"{not json", 400, "body"),
    ({"history": "105"}, 422, "history"),
    ({"history": [["105"]]}, 422, "history.0"),
    ({"history": []}, 400, "history"),
    ({"histories": [["105"], []]}, 400, "histories[1]"),
    ({"history": ["105"], "histories": [["105"]]}, 400, "history"),
    ({}, 400, "history"),
    ({"history": ["zzz"]}, 400, "history"),
    ({"history": ["105"], "k": 0}, 422, "k"),
    ({"history": ["105"], "k": 31}, 400, "k"),
    ({"history": ["105"], "k": "3"}, 422, "k"),
    ({"history": ["105"], "k": True}, 422, "k"),
    ({"history": ["105"], "size": 12}, 400, "size"),
    ({"history": ["105"], "funnel": "16:5,8"}, 400, "funnel"),
    ({"history": ["105"], "k": 10, "funnel": "8:5,16"}, 400, "funnel"),
    ({"history": ["105"], "context": "all"}, 422, "context"),
    ({"history": ["105"], "exclude_seen": "yes"}, 422, "exclude_seen"),
    ({"history": ["105"], "topk": 3}, 422, "topk"),
    ([1, 2], 422, "body"),
]


@pytest.mark.parametrize("body,status,field", BAD)
def test_every_bad_request_is_a_4xx_naming_its_field(client, body, status, field):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    response = client.post("/recommend", **kwargs)
    assert (response.status_code, response.json()["field"]) == (status, field), response.json()
    assert response.json()["error"]
    assert client.post("/recommend", json={"history": ["105"]}).status_code == 200  # still serving


@pytest.mark.parametrize("body,status,field", [({"events": []}, 422, "events"), ({"events": ["zzz"]}, 400, "events"),
                                               ({"events": ["105"], "size": 12}, 400, "size"),
                                               ({"events": ["105"], "k": 99}, 400, "k")])
def test_bad_session_events_are_4xx_and_open_no_session(client, body, status, field):
    response = client.post("/sessions/s/events", json=body)
    assert (response.status_code, response.json()["field"]) == (status, field)
    assert client.get("/info").json()["sessions"] == 0


def test_a_body_over_the_limit_is_413_declared_or_streamed(arts):
    with TestClient(create_app(Engine(arts[0]), ServeOptions(max_body_bytes=1000)), client=LOCAL) as c:
        big = json.dumps({"history": ["105"] * 400}).encode()
        assert c.post("/recommend", content=big, headers={"content-type": "application/json"}).status_code == 413
        streamed = c.post("/recommend", content=iter([big[:600], big[600:]]), headers={"content-type": "application/json"})
        assert streamed.status_code == 413 and streamed.json()["field"] == "body"
        assert c.post("/recommend", json={"history": ["105"]}).status_code == 200


def test_hot_swap_under_concurrent_requests_fails_no_request(arts, tmp_path):
    wants = [Recommender.load(a).recommend([HISTORIES[0]], k=5)[0]["items"] for a in arts]
    assert wants[0] != wants[1]  # the two artifacts rank differently: a swap is visible
    damaged = tmp_path / "damaged"
    shutil.copytree(arts[1], damaged)
    weights = damaged / "size-16" / "model.pt"
    weights.write_bytes(weights.read_bytes()[:-7] + b"garbage")
    with TestClient(create_app(Engine(arts[0]), ServeOptions(max_wait_ms=1)), client=LOCAL) as c:
        stop, seen, failures = threading.Event(), set(), []

        def hammer():
            while not stop.is_set():
                r = c.post("/recommend", json={"history": HISTORIES[0], "k": 5})
                if r.status_code != 200:
                    failures.append(r.status_code)
                else:
                    seen.add(tuple(r.json()["results"][0]["items"]))

        with ThreadPoolExecutor(4) as pool:
            for _ in range(4):
                pool.submit(hammer)
            for i in range(6):
                time.sleep(0.05)
                assert c.post("/admin/reload", json={"artifact": str(arts[(i + 1) % 2])}).status_code == 200
            refused = c.post("/admin/reload", json={"artifact": str(damaged)})
            time.sleep(0.05)
            stop.set()
        assert refused.status_code == 409 and "still serving" in refused.json()["error"]
        info = c.get("/info").json()
        assert info["generation"] == 6 and info["artifact"] == str(arts[0])  # the damaged one never served
        assert failures == [] and seen == {tuple(w) for w in wants}
        assert 'fmrl_reloads_total{result="refused"} 1' in c.get("/metrics").text


def test_admin_reload_is_for_loopback_clients_only(arts):
    with TestClient(create_app(Engine(arts[0])), client=("10.1.2.3", 4000)) as c:
        response = c.post("/admin/reload")
        assert response.status_code == 403 and response.json()["field"] == "client"
    with TestClient(create_app(Engine(arts[0]), ServeOptions(remote_admin=True)), client=("10.1.2.3", 4000)) as c:
        assert c.post("/admin/reload").json()["generation"] == 1


def test_health_info_and_prometheus_metrics(arts, client):
    assert client.get("/healthz").json() == {"status": "ok"} and client.get("/readyz").json() == {"ready": True}
    info = client.get("/info").json()
    assert info["sizes"] == [8, 16] and info["items"] == 30 and info["window"] == 6 and info["manifest"]["format"]
    client.post("/recommend", json={"history": ["105"]})
    client.post("/recommend", json={"history": []})
    text = client.get("/metrics").text
    assert 'fmrl_requests_total{route="/recommend",status="200"} 1' in text
    assert 'fmrl_requests_total{route="/recommend",status="400"} 1' in text
    assert 'fmrl_request_seconds_bucket{route="/recommend",le="+Inf"} 2' in text
    assert "fmrl_batch_size_count 2" in text  # each request its own batch here (no concurrency)
    for line in text.splitlines():  # every sample line is `name{labels} value`
        assert line.startswith("#") or float(line.rsplit(" ", 1)[1]) >= 0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_serve_command_reloads_on_sighup_and_drains_on_sigterm(arts):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, str(ROOT / "run_recbole_fmrl.py"), "serve", "--artifact", str(arts[0]),
                               "--port", str(port), "--max-wait-ms", "300"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        want = Recommender.load(arts[0]).recommend([HISTORIES[0]], k=5)
        same(httpx.post(f"{base}/recommend", json={"history": HISTORIES[0], "k": 5}).json()["results"], want)
        server.send_signal(signal.SIGHUP)
        for _ in range(100):
            if httpx.get(f"{base}/info").json()["generation"] == 1:
                break
            time.sleep(0.1)
        assert httpx.get(f"{base}/info").json()["generation"] == 1
        with ThreadPoolExecutor(1) as pool:  # in flight when SIGTERM lands: it waits 300 ms for a batch
            pending = pool.submit(httpx.post, f"{base}/recommend", json={"history": HISTORIES[0], "k": 5}, timeout=30)
            time.sleep(0.1)
            server.send_signal(signal.SIGTERM)
            same(pending.result().json()["results"], want)
        # uvicorn shuts down gracefully, then re-raises the signal it caught (exit status -SIGTERM)
        assert server.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if server.poll() is None:
            server.kill()
        output = server.communicate()[0]
    assert "Application startup complete" in output and "Application shutdown complete" in output, output[-2000:]
    assert "serving" in output and "(generation 1)" in output  # the SIGHUP reload, logged


def test_the_serve_command_refuses_a_bad_artifact_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "run_recbole_fmrl.py"), "serve", "--artifact", str(tmp_path / "none")],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0
    assert done.stderr.startswith(f"error: {tmp_path / 'none'}")
