"""Load test of ``recbole-fmrl serve``: HTTP throughput and latency against in-process batching.

A real server process (uvicorn, one model thread) on loopback, and an asyncio client in this process
(keep-alive HTTP/1.1 connections): C concurrent clients (1 / 8 / 64) each send one user's history per request, for a bounded
time and number of requests, at each size (16 / 64 / 256). Beside each cell: the in-process batched
throughput of the same engine at that size (``Engine.run_batch`` on batches of 64 users): the ceiling
HTTP is measured against. Two more runs at 64 clients: during hot swaps (``POST /admin/reload`` every
second) and with a corpus of bad requests mixed in (every fourth request). Writes ``results/serve.md``,
``serve.json`` and ``serve.png``.

    python -m benchmarks.serve --checkpoint CKPT.pth --data-path data --dataset amazon-beauty
"""
import argparse
import asyncio
import json
import os
import random
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

from recbole_fmrl.atomic_write import write_text
from recbole_fmrl.environment import describe_machine

ROOT = Path(__file__).resolve().parents[1]
BAD_BODIES = [b"{not json", b'{"history": []}', b'{"history": ["no-such-item"]}', b'{"history": ["%s"], "k": 0}',
              b'{"history": ["%s"], "size": 12}', b'{"history": "x"}', b'{"histories": [[]]}', b'{"history": ["%s"], "k": "3"}']


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="training checkpoint to export (or --artifact)")
    p.add_argument("--artifact", default=None, help="an export root to serve instead of exporting the checkpoint")
    p.add_argument("--data-path", default="data")
    p.add_argument("--dataset", default="amazon-beauty", help="histories: each user's last --window items")
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--seconds", type=float, default=8.0, help="per cell")
    p.add_argument("--max-requests", type=int, default=20_000, help="per cell")
    p.add_argument("--window", type=int, default=50)
    p.add_argument("--output", default=str(ROOT / "results" / "serve.md"))
    p.add_argument("--work-dir", default=str(ROOT / "runs" / "serve-bench"))
    return p.parse_args(argv)


def log(message):
    print(f"[serve {time.strftime('%H:%M:%S')}] {message}", flush=True)


def histories(data_path, dataset, window, limit=5000, seed=0):
    """The last ``window`` items of users of ``<dataset>.inter`` (time order), raw ids."""
    users = {}
    with open(Path(data_path) / dataset / f"{dataset}.inter", encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        u, i, t = (header.index(c) for c in ("user_id:token", "item_id:token", "timestamp:float"))
        for line in f:
            cols = line.rstrip("\n").split("\t")
            users.setdefault(cols[u], []).append((float(cols[t]), cols[i]))
    rows = [[item for _, item in sorted(events)][-window:] for events in users.values()]
    random.Random(seed).shuffle(rows)
    return rows[:limit]


def artifact_of(args):
    if args.artifact:
        return Path(args.artifact)
    from recbole_fmrl.deploy.export import export_sizes

    folder = Path(args.work_dir) / f"artifacts-{Path(args.checkpoint).stem}"
    if not (folder / f"size-{max(args.sizes)}" / "manifest.json").is_file():
        export_sizes(args.checkpoint, [max(args.sizes)], folder, onnx=False)
    return folder


def in_process(folder, size, users, batch=64, seconds=2.0, rounds=3):
    """Users per second of the engine itself at ``size``, batches of ``batch`` single-user queries: the
    best of ``rounds`` (a shared machine only ever slows a round down)."""
    import torch

    from recbole_fmrl.serve.engine import Engine, Query

    torch.set_num_threads(1)
    engine = Engine(folder)
    queries = [Query((tuple(h),), k=10, size=size) for h in users]
    engine.run_batch(queries[:batch])  # warm-up
    best = 0.0
    for _ in range(rounds):
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            engine.run_batch([queries[(done + j) % len(queries)] for j in range(batch)])
            done += batch
        best = max(best, done / (time.perf_counter() - start))
    return best


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder, port):
    cmd = [sys.executable, str(ROOT / "run_recbole_fmrl.py"), "serve", "--artifact", str(folder), "--port", str(port),
           "--threads", "1", "--max-batch", "64", "--max-wait-ms", "0"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    import httpx

    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return server, shlex.join(cmd[1:])
        except httpx.TransportError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("error: the server did not become ready in 120 s")


class Connection:
    """A keep-alive HTTP/1.1 client connection on loopback: lean enough that the server, not the client,
    is what a cell measures (httpx's pool, tried first, was itself the bottleneck at 64 clients)."""

    def __init__(self, port):
        self.port, self.reader, self.writer = port, None, None

    async def post(self, path, body):
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        try:
            self.writer.write(head + body)
            await self.writer.drain()
            lines = (await self.reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
            headers = dict(line.split(b":", 1) for line in lines[1:] if b":" in line)
            payload = await self.reader.readexactly(int(headers.get(b"content-length", b"0")))
        except (OSError, asyncio.IncompleteReadError):
            self.close()
            return -1, b""
        if headers.get(b"connection", b"").strip().lower() == b"close":
            self.close()
        return int(lines[0].split()[1]), payload

    def close(self):
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def load(port, bodies, clients, seconds, max_requests, reload_every=None):
    """(latencies of 200s, status counts, wall seconds, reload statuses) of ``clients`` concurrent loops."""
    latencies, statuses, sent, reloads = [], {}, [0], []
    deadline = time.perf_counter() + seconds

    async def loop(worker):
        connection = Connection(port)
        while time.perf_counter() < deadline and sent[0] < max_requests:
            body, valid = bodies[(sent[0] * 7919 + worker) % len(bodies)]
            sent[0] += 1
            start = time.perf_counter()
            code, _ = await connection.post("/recommend", body)
            key = ("valid " if valid else "bad ") + str(code)
            statuses[key] = statuses.get(key, 0) + 1
            if valid and code == 200:
                latencies.append(time.perf_counter() - start)
        connection.close()

    async def swapper():
        connection = Connection(port)
        while time.perf_counter() < deadline - reload_every:
            await asyncio.sleep(reload_every)
            reloads.append((await connection.post("/admin/reload", b"{}"))[0])
        connection.close()

    start = time.perf_counter()
    await asyncio.gather(*([loop(w) for w in range(clients)] + ([swapper()] if reload_every else [])))
    return latencies, statuses, time.perf_counter() - start, reloads


def summarise(latencies, statuses, wall, reloads=()):
    ordered = sorted(latencies)

    def pct(q):
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None

    def failed(key):  # a 5xx or a dropped connection
        code = int(key.split()[1])
        return code < 0 or code >= 500

    return {"requests_per_s": len(latencies) / wall, "p50_ms": pct(0.50), "p99_ms": pct(0.99), "statuses": statuses,
            "valid_errors": sum(n for k, n in statuses.items() if k.startswith("valid ") and k != "valid 200"),
            "bad_5xx": sum(n for k, n in statuses.items() if k.startswith("bad ") and failed(k)),
            "reloads": list(reloads)}


def bodies_for(users, size, bad_share=0.0):
    good = [(json.dumps({"history": h, "k": 10, "size": size}).encode(), True) for h in users]
    if not bad_share:
        return good
    item = users[0][-1].encode()
    bad = [(b.replace(b"%s", item), False) for b in BAD_BODIES]
    every = int(round(1 / bad_share))
    return [bad[i // every % len(bad)] if i % every == 0 else good[i] for i in range(len(good))]


def run_cells(args, folder, users):
    port = free_port()
    server, command = start_server(folder, port)
    cells = []
    try:
        for size in args.sizes:
            ceiling = in_process(folder, size, users)
            log(f"size {size}: in-process batched {ceiling:,.0f} users/s")
            for clients in args.clients:
                row = summarise(*asyncio.run(load(port, bodies_for(users, size), clients, args.seconds, args.max_requests)))
                cells.append({"size": size, "clients": clients, "in_process_users_per_s": ceiling, **row})
                log(f"size {size}, {clients} clients: {row['requests_per_s']:,.0f} req/s, p50 {row['p50_ms']:.1f} ms, "
                    f"p99 {row['p99_ms']:.1f} ms, valid errors {row['valid_errors']}")
        mid = 64 if 64 in args.sizes else args.sizes[0]
        swap = summarise(*asyncio.run(load(port, bodies_for(users, mid), 64, args.seconds, args.max_requests, reload_every=1.0)))
        bad = summarise(*asyncio.run(load(port, bodies_for(users, mid, 0.25), 64, args.seconds, args.max_requests)))
        log(f"hot swap: {swap['valid_errors']} errors over {len(swap['reloads'])} reloads; bad mix: {bad['bad_5xx']} 5xx")
    finally:
        server.terminate()
        server.wait(timeout=60)
    return cells, {"size": mid, **swap}, {"size": mid, **bad}, command


def plot(cells, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for size in sorted({c["size"] for c in cells}):
        rows = [c for c in cells if c["size"] == size]
        ax1.plot([c["clients"] for c in rows], [c["requests_per_s"] for c in rows], marker="o", label=f"HTTP, size {size}")
        ax1.axhline(rows[0]["in_process_users_per_s"], linestyle=":", color=ax1.lines[-1].get_color())
        ax2.plot([c["clients"] for c in rows], [c["p99_ms"] for c in rows], marker="o", label=f"size {size}")
    ax1.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="users / s (dotted: in-process batched)")
    ax2.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="p99 latency (ms)")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(args, cells, swap, bad, server_command, n_users, seconds):
    lines = ["# Serving: HTTP load test of `recbole-fmrl serve`", "",
             f"Command: `python -m benchmarks.serve {shlex.join(sys.argv[1:])}` ({seconds / 60:.1f} min). Server: `{server_command}`.",
             f"Machine: {describe_machine()}, shared with other jobs while it ran; client and server on the same 2 cores, "
             "loopback. One model thread in the server; the client is one asyncio process of keep-alive HTTP/1.1 connections.",
             f"Histories: the last {args.window} items of {n_users} users of `{args.dataset}` (one user per request, k = 10); "
             f"checkpoint `{Path(args.checkpoint).name}`. Each cell: {args.seconds:g} s or {args.max_requests} requests.", "",
             "| size | clients | HTTP users/s | in-process batched users/s | HTTP / in-process | p50 ms | p99 ms | errors on valid requests |",
             "|---|---|---|---|---|---|---|---|"]
    for c in cells:
        lines.append(f"| {c['size']} | {c['clients']} | {c['requests_per_s']:,.0f} | {c['in_process_users_per_s']:,.0f} | "
                     f"{c['requests_per_s'] / c['in_process_users_per_s']:.2f} | {c['p50_ms']:.1f} | {c['p99_ms']:.1f} | {c['valid_errors']} |")
    lines += ["", f"**Hot swap** (size {swap['size']}, 64 clients, `POST /admin/reload` every second: {len(swap['reloads'])} reloads, "
              f"statuses {sorted(set(swap['reloads']))}): {swap['requests_per_s']:,.0f} users/s, p99 {swap['p99_ms']:.1f} ms, "
              f"**{swap['valid_errors']} failed requests**.", "",
              f"**Bad requests mixed in** (size {bad['size']}, 64 clients, every fourth request from a corpus of "
              f"{len(BAD_BODIES)} bad bodies: malformed JSON, empty history, unknown id, k = 0, a size that is not nested, "
              f"wrong types): statuses {json.dumps(bad['statuses'], sort_keys=True)}; **{bad['bad_5xx']} 5xx**, "
              f"{bad['valid_errors']} errors on the valid requests.", "", "![throughput and p99](serve.png)", ""]
    out = Path(args.output)
    write_text(out, "\n".join(lines))
    write_text(out.with_suffix(".json"), json.dumps({"cells": cells, "hot_swap": swap, "bad_mix": bad}, indent=1))
    plot(cells, out.with_suffix(".png"))
    log(f"wrote {out}")


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    folder = artifact_of(args)
    users = histories(args.data_path, args.dataset, args.window)
    cells, swap, bad, command = run_cells(args, folder, users)
    report(args, cells, swap, bad, command, len(users), time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
