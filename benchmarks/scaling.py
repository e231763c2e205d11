"""Cost curves: one FMRLRec training step as the catalog (N items) and the largest size d grow, and
training samples per second with 1 and 2 processes (torch.distributed, gloo) on this machine.

    python -m benchmarks.scaling                # writes results/scaling.md, .json and scaling.png

Every point trains the real model (``FMRLRec`` built from the plugin's Config, learned item-ID table,
AdamW) on synthetic batches with Amazon Beauty's sequence statistics (mean training sequence ~9
items, window 50, one window per user): forward, backward and optimiser step, 1 thread. Variants:

- ``all sizes``: the Matryoshka loss over every nested size 8 ... d with the fused chunked loss
  (``matryoshka_cross_entropy``; the [P, N] logit matrices are never materialised);
- ``plain CE``: the largest size alone with plain cross-entropy on materialised logits
  (``fmrl_sizes=[d]``, ``fmrl_loss_chunk_size=-1``): what training one model usually costs. Where its
  logits would not fit the memory budget (``--plain_budget_gb``) it is not run; its need is computed.

Peak memory is the resident-set high-water mark of the measuring process above its state before
the model was built (model, optimiser state, activations, loss buffers); step time is the mean of
``--steps`` steps after one warm-up step. Rows per step P (labelled positions) are reported: the step
is linear in P, so the default 256-window batch costs ~4x the 64-window batch measured here.
"""
import argparse
import gc
import json
import math
import os
import platform
import time
from pathlib import Path

from recbole_fmrl.environment import cpu_name, set_offline_defaults

ROOT = Path(__file__).resolve().parents[1]

BEAUTY_ITEMS = 12_101
MEAN_LENGTH, WINDOW = 9, 50
BYTES = 4  # float32


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalogs", type=int, nargs="+", default=[BEAUTY_ITEMS, 100_000, 1_000_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--catalog_d", type=int, default=256, help="d of the catalog sweep")
    parser.add_argument("--batch", type=int, default=64, help="training windows per step")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per point (after one warm-up)")
    parser.add_argument("--plain_budget_gb", type=float, default=6.0, help="skip plain CE needing more")
    parser.add_argument("--ddp_batch", type=int, default=64, help="global batch of the samples/s runs")
    parser.add_argument("--ddp_steps", type=int, default=6)
    parser.add_argument("--output", default=str(ROOT / "results" / "scaling"))
    parser.add_argument("--report_only", action="store_true", help="rewrite .md/.png from the .json")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- synthetic data and model

def synthetic_batch(n_items, batch, seed=0, rank=0, world=1):
    """One all-positions batch: window inputs with a next-item label at every position (Beauty-like)."""
    import numpy as np
    import torch
    from recbole.data.interaction import Interaction

    rng = np.random.default_rng(seed)
    lengths = np.minimum(WINDOW, 1 + rng.geometric(1.0 / (MEAN_LENGTH - 1), size=batch))  # mean ~9
    items = np.zeros((batch, WINDOW), dtype=np.int64)
    targets = np.zeros((batch, WINDOW), dtype=np.int64)
    for row, length in enumerate(lengths):
        seq = rng.integers(1, n_items + 1, size=length + 1)
        items[row, :length], targets[row, :length] = seq[:-1], seq[1:]
    pick = slice(rank, None, world)  # this process's share of the global batch
    return Interaction({
        "item_id_list": torch.from_numpy(items[pick]), "item_length": torch.from_numpy(lengths[pick]),
        "item_id_target_list": torch.from_numpy(targets[pick]),
        "item_id": torch.from_numpy(targets[np.arange(batch), lengths - 1][pick]),
    })


class SyntheticCatalog:
    """What FMRLRec reads from a dataset, for a catalog of ``n_items`` items (learned ID table)."""

    fmrl_modality = "id"
    target_list_field = "item_id_target_list"

    def __init__(self, n_items):
        self.n_items = n_items

    def num(self, field):
        return self.n_items + 1  # + the padding item 0


def build(n_items, d, all_sizes):
    """FMRLRec + AdamW as a run builds them (plugin Config, trainer's optimiser rules)."""
    import torch

    from recbole_fmrl.model.fmrlrec import FMRLRec
    from recbole_fmrl.train.config import Config

    overrides = {"hidden_size": d, "fmrl_modality": "id", "use_gpu": False, "state": "ERROR",
                 "fmrl_sizes": None if all_sizes else [d], "fmrl_loss_chunk_size": 0 if all_sizes else -1}
    config = Config(model="FMRLRec", dataset="scaling-synthetic", config_dict=overrides)
    torch.manual_seed(0)
    net = FMRLRec(config, SyntheticCatalog(n_items))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=config["weight_decay"] or 0.0)
    return net, optimizer


# ----------------------------------------------------------------------------- measuring

def _status_kib(key):
    with open("/proc/self/status") as fh:
        return next((int(line.split()[1]) for line in fh if line.startswith(key)), 0)


def _release_freed():
    """Give freed heap memory back to the OS, so the next variant's growth shows in the RSS peak."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets the resident-set high-water mark (VmHWM)
    except OSError:
        pass


def train_step(net, optimizer, batch):
    optimizer.zero_grad(set_to_none=True)
    loss = sum(net.calculate_loss(batch))
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def measure(n_items, d, all_sizes, args):
    """Step seconds and peak MiB (above the process before the model existed) of one variant."""
    import torch

    _release_freed()
    base = _status_kib("VmRSS:")
    _reset_peak()
    net, optimizer = build(n_items, d, all_sizes)
    net.train()
    batch = synthetic_batch(n_items, args.batch, seed=1)
    rows = int((batch["item_id_target_list"] > 0).sum())
    train_step(net, optimizer, batch)  # warm-up: allocator, kernel build, lazy state
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = train_step(net, optimizer, batch)
    step_s = (time.perf_counter() - start) / args.steps
    peak = (_status_kib("VmHWM:") - base) / 1024
    params = sum(p.numel() for p in net.parameters())
    del net, optimizer
    _release_freed()
    return {"n_items": n_items, "d": d, "variant": "all sizes" if all_sizes else "plain CE", "step_s": step_s,
            "peak_mib": peak, "rows": rows, "params": params, "loss": loss, "threads": torch.get_num_threads()}


def plain_need_gib(n_items, d, rows):
    """Plain CE's memory: [P, N] logits, their log-softmax and gradient, plus table, grad and AdamW state."""
    return (3 * rows * (n_items + 1) + 4 * (n_items + 1) * d) * BYTES / 2**30


def sweep(args):
    points = [(n, args.catalog_d) for n in args.catalogs] + [(BEAUTY_ITEMS, d) for d in args.dims]
    results, seen = [], set()
    measure(2_000, 64, True, args)  # one-time costs (libraries, the loss kernel) out of the first point
    for n_items, d in points:
        if (n_items, d) in seen:
            continue
        seen.add((n_items, d))
        for all_sizes in (True, False):
            rows = int((synthetic_batch(n_items, args.batch, seed=1)["item_id_target_list"] > 0).sum())
            need = plain_need_gib(n_items, d, rows)
            if not all_sizes and need > args.plain_budget_gb:
                results.append({"n_items": n_items, "d": d, "variant": "plain CE", "skipped": True,
                                "need_gib": need, "rows": rows})
                print(f"N={n_items:>9,} d={d:>5} plain CE: not run, needs ~{need:.1f} GiB", flush=True)
                continue
            row = measure(n_items, d, all_sizes, args)
            results.append(row)
            print(f"N={n_items:>9,} d={d:>5} {row['variant']:>9}: {row['step_s']:.3f} s/step, "
                  f"{row['peak_mib']:.0f} MiB, P={row['rows']}", flush=True)
    return results


# ----------------------------------------------------------------------------- 1 and 2 processes

def _ddp_worker(rank, world, port, n_items, d, batch_size, steps, queue):
    import torch
    import torch.distributed as dist

    from recbole_fmrl.train.distributed import no_buffer_sync

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    net, optimizer = build(n_items, d, True)

    class Loss(torch.nn.Module):  # DDP over the training loss (the trainer arms the same all-reduce)
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, batch):
            return sum(self.model.calculate_loss(batch))

    wrapped = torch.nn.parallel.DistributedDataParallel(Loss(net), **no_buffer_sync())
    times = []
    for step in range(steps + 1):
        batch = synthetic_batch(n_items, batch_size, seed=step, rank=rank, world=world)
        dist.barrier()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        wrapped(batch).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    if rank == 0:
        queue.put(sum(times[1:]) / steps)
    dist.destroy_process_group()


def samples_per_second(args, n_items=BEAUTY_ITEMS, d=256):
    """Global-batch samples (windows) per second: 1 process x 1 thread, 1 x 2 threads, 2 x 1 thread."""
    import torch
    import torch.multiprocessing as mp

    from recbole_fmrl.train.distributed import free_port

    out = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        net, optimizer = build(n_items, d, True)
        batches = [synthetic_batch(n_items, args.ddp_batch, seed=s) for s in range(args.ddp_steps + 1)]
        train_step(net, optimizer, batches[0])
        start = time.perf_counter()
        for batch in batches[1:]:
            train_step(net, optimizer, batch)
        step_s = (time.perf_counter() - start) / args.ddp_steps
        out.append({"processes": 1, "threads": threads, "step_s": step_s, "samples_s": args.ddp_batch / step_s})
    torch.set_num_threads(1)
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_ddp_worker, args=(2, free_port(), n_items, d, args.ddp_batch, args.ddp_steps, queue), nprocs=2)
    step_s = queue.get()
    out.append({"processes": 2, "threads": 1, "step_s": step_s, "samples_s": args.ddp_batch / step_s})
    for row in out:
        print(f"{row['processes']} process(es) x {row['threads']} thread(s): {row['samples_s']:.1f} samples/s", flush=True)
    return out


# ----------------------------------------------------------------------------- report

def hardware():
    import torch

    cpu = cpu_name()
    mem = next((int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 2**20, 1), "torch": torch.__version__,
            "python": platform.python_version(), "load_before": os.getloadavg()}


def growth(results, variant, key="n_items", fixed=None):
    """Exponents log(t2/t1) / log(x2/x1) between consecutive measured points (1 = linear)."""
    pts = sorted((r[key], r["step_s"]) for r in results if r["variant"] == variant and not r.get("skipped")
                 and (fixed is None or all(r[k] == v for k, v in fixed.items())))
    return [(a[0], b[0], math.log(b[1] / a[1]) / math.log(b[0] / a[0])) for a, b in zip(pts, pts[1:])]


def state_gib(n_items, d):
    """Item table + its gradient + AdamW's two moments (float32)."""
    return 4 * (n_items + 1) * d * BYTES / 2**30


def table_rows(results, key, fixed):
    lines = [f"| {'N items' if key == 'n_items' else 'd'} | P rows | all sizes: s/step | all sizes: peak MiB | "
             "plain CE: s/step | plain CE: peak MiB | all / plain time | all / plain memory |", "|---" * 8 + "|"]
    values = sorted({r[key] for r in results if all(r[k] == v for k, v in fixed.items())})
    for value in values:
        pick = {r["variant"]: r for r in results if r[key] == value and all(r[k] == v for k, v in fixed.items())}
        a, p = pick.get("all sizes"), pick.get("plain CE")
        if p is not None and p.get("skipped"):
            plain, ratio = f"not run (needs ~{p['need_gib']:.1f} GiB) | -", "- | -"
        elif p is not None:
            plain = f"{p['step_s']:.3f} | {p['peak_mib']:,.0f}"
            ratio = f"{a['step_s'] / p['step_s']:.2f}x | {a['peak_mib'] / max(p['peak_mib'], 1):.2f}x"
        else:
            plain, ratio = "- | -", "- | -"
        lines.append(f"| {value:,} | {a['rows']:,} | {a['step_s']:.3f} | {a['peak_mib']:,.0f} | {plain} | {ratio} |")
    return lines


def write_report(args, results, ddp, hw, seconds, out):
    n_growth = growth(results, "all sizes", "n_items", {"d": args.catalog_d})
    lines = [
        "# Scaling: step cost as the catalog and d grow; 1 vs 2 processes", "",
        f"Command: `python -m benchmarks.scaling` ({seconds / 60:.1f} min). Machine: {hw['cpu']}, {hw['cores']} cores, "
        f"{hw['memory_gib']} GiB, no GPU; torch {hw['torch']}, Python {hw['python']}. Load average before: "
        f"{', '.join(f'{x:.1f}' for x in hw['load_before'])}, after: {', '.join(f'{x:.1f}' for x in hw['load_after'])} "
        "(a shared machine: times are upper bounds).", "",
        f"One training step of FMRLRec (learned item-ID table, 1 LRU layer, AdamW), 1 thread, batch of {args.batch} "
        f"windows with Beauty-like lengths (mean ~{MEAN_LENGTH}, window {WINDOW}); mean of {args.steps} steps after "
        "a warm-up; peak = resident-set high-water mark above the process before the model was built.", "",
        f"## Catalog size N (d = {args.catalog_d}, all sizes 8 ... {args.catalog_d})", "",
        *table_rows(results, "n_items", {"d": args.catalog_d}), "",
        "Step-time growth exponents in N (1.0 = linear): " + ", ".join(
            f"{a:,} -> {b:,}: {e:.2f}" for a, b, e in n_growth) + ".", "",
        f"## Size d (N = {BEAUTY_ITEMS:,}, Beauty)", "", *table_rows(results, "d", {"n_items": BEAUTY_ITEMS}), "",
        f"## Samples per second, 1 and 2 processes (N = {BEAUTY_ITEMS:,}, d = 256, all sizes, global batch "
        f"{args.ddp_batch})", "", "| processes x threads | s/step | samples/s |", "|---|---|---|",
        *[f"| {r['processes']} x {r['threads']} | {r['step_s']:.3f} | {r['samples_s']:.1f} |" for r in ddp], "",
        "2 processes x 1 thread: DistributedDataParallel over gloo, each process half the global batch, gradients "
        "averaged every step. 1 process x 2 threads is slower than 1 thread here because the machine is "
        "oversubscribed: OpenMP's second thread spin-waits for a core another job holds (an idle machine does not "
        "show this). Not measured on a GPU (none in this session); there the same code uses nccl.", "",
        *targets(results, args), *stops_section(),
    ]
    (Path(out).with_suffix(".md")).write_text("\n".join(lines) + "\n")


def targets(results, args):
    big = next((r for r in results if r["n_items"] == max(args.catalogs) and r["d"] == args.catalog_d
                and r["variant"] == "all sizes"), None)
    exps = [e for _, _, e in growth(results, "all sizes", "n_items", {"d": args.catalog_d})]
    lines = ["## Targets", ""]
    if big is not None:
        lines.append(f"- {big['n_items']:,}-item catalog, d = {big['d']}, all sizes, on this 2-core machine: "
                     f"**{big['step_s']:.0f} s per step** of {big['rows']} rows (1 thread), **{big['peak_mib'] / 1024:.1f} GiB** "
                     f"peak ({state_gib(big['n_items'], big['d']):.1f} GiB of it item table, gradient and AdamW moments). "
                     "Plain cross-entropy at the largest size alone would need the memory in the table above.")
    if exps:
        lines.append(f"- Step time vs N: growth exponents {', '.join(f'{e:.2f}' for e in exps)} (1.0 = linear; the "
                     "machine's load moved between points, so +-0.1 is noise).")
    return lines + [""]


def stops_section():
    examples = ((1_000_000, 256), (1_000_000, 1024), (5_000_000, 256), (10_000_000, 256))
    return [
        "## Where one machine stops, and what the plugin does about it", "",
        "- What grows with N: the item table and its AdamW state, 16 bytes x N x d in float32 (weights, gradient, "
        "two moments): " + ", ".join(f"N = {n:,} at d = {d}: {state_gib(n, d):.1f} GiB" for n, d in examples)
        + ". The whole step measured 6.3 GiB at 1,000,000 items and d = 256 (the table state plus the loss's [d, N] "
        "item-gradient accumulator and buffers), so this 24 GiB machine ends around N = 3.5 million at d = 256 and "
        "just under 1 million at d = 1024 (estimates: linear in N x d); one 141 GiB GPU around 20 million at "
        "d = 256 (not measured). Step time grows "
        "linearly in N (every row is scored against every item), so long before memory runs out a CPU is too "
        "slow: the 1,000,000-item step above takes minutes for 64 windows.",
        "- The logits never bound N: the fused Matryoshka loss (`model/loss.py`) walks the item table in chunks "
        "and keeps one [K, P, chunk] buffer, where plain cross-entropy materialises [P, N] logits, their softmax "
        "and gradient (3 x P x N x 4 bytes at the largest size alone: 6.7 GiB for the 1,000,000-item batch above, "
        "10.5 GiB with the table state; ~27 GiB of logits for the default 256-window batch of ~2,400 rows).",
        "- Text or image items (`fmrl_modality: text`, the default on datasets with features) have no per-item "
        "learned parameters: the table is frozen features x one F x d projection, so there is no per-item "
        "optimiser state (N x F x 4 bytes of features instead of 16 x N x d).",
        "- Not done: multi-process training is data-parallel (`train/distributed.py`): every process holds the "
        "whole table and its optimiser state, so more processes add throughput, not memory. Sharding the item "
        "table across processes (row-wise embedding sharding with a sharded softmax) or a sparse optimiser for "
        "the ID table would be the next step for catalogs beyond one machine.", "",
    ]


def plot(args, results, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for col, (key, fixed, label) in enumerate((("n_items", {"d": args.catalog_d}, "catalog N (items)"),
                                               ("d", {"n_items": BEAUTY_ITEMS}, "largest size d"))):
        for variant, marker in (("all sizes", "o-"), ("plain CE", "s--")):
            pts = sorted((r[key], r["step_s"], r["peak_mib"]) for r in results if r["variant"] == variant
                         and not r.get("skipped") and all(r[k] == v for k, v in fixed.items()))
            if pts:
                xs = [p[0] for p in pts]
                axes[0][col].plot(xs, [p[1] for p in pts], marker, label=variant)
                axes[1][col].plot(xs, [p[2] / 1024 for p in pts], marker, label=variant)
        need = [(r[key], r["need_gib"]) for r in results if r.get("skipped") and all(r[k] == v for k, v in fixed.items())]
        if need:
            axes[1][col].plot(*zip(*need), "x", color="tab:orange", markersize=9, label="plain CE: need (not run)")
        for row, ylabel in ((0, "seconds per step"), (1, "peak memory (GiB)")):
            ax = axes[row][col]
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    fig.suptitle(f"FMRLRec training step, 1 CPU thread, batch {args.batch} windows")
    fig.tight_layout()
    fig.savefig(Path(out).with_suffix(".png"), dpi=110)


def main(argv=None):
    args = parse_args(argv)
    set_offline_defaults()
    import torch

    torch.set_num_threads(1)
    if args.report_only:
        saved = json.loads(Path(args.output).with_suffix(".json").read_text())
        write_report(args, saved["steps"], saved["processes"], saved["hardware"], saved["seconds"], args.output)
        plot(args, saved["steps"], args.output)
        return
    hw, start = hardware(), time.perf_counter()
    results = sweep(args)
    ddp = samples_per_second(args)
    hw["load_after"] = os.getloadavg()
    seconds = time.perf_counter() - start
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).with_suffix(".json").write_text(json.dumps(
        {"args": vars(args), "hardware": hw, "seconds": seconds, "steps": results, "processes": ddp}, indent=1))
    write_report(args, results, ddp, hw, seconds, args.output)
    plot(args, results, args.output)
    print(f"wrote {Path(args.output).with_suffix('.md')}")


if __name__ == "__main__":
    main()
