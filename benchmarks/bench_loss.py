"""Benchmark: fused chunked Matryoshka CE vs plain single-size CE vs the materialising reference.

Times forward+backward (grads wrt hidden and items) and measures peak extra memory of each
variant, all in one process on the same inputs (Amazon-Beauty-like shapes by default), and writes
``results/loss_bench.md``.

    python -m benchmarks.bench_loss                       # P=2800 N=12101, d=64 and 256
    python -m benchmarks.bench_loss --chunks 0,256,512    # chunk sweep (0 = auto)
    python -m benchmarks.bench_loss --rows 0,64,128       # single-pass row-block sweep (0 = auto)

"single-pass" rows pass ``weights`` (uniform 1/K here) and back-propagate exactly those
weights, so the gradients computed during the forward are reused (the model's case), with the
compiled loss kernel (``recbole_fmrl/model/native.py``) or with PyTorch ops only; "fused" rows
are the item-chunked path that recomputes the logits in backward.

Memory: "peak alloc" is the peak of bytes held by live tensors above the level at entry (torch
profiler allocation events, exact, independent of the malloc implementation); "peak RSS" is the
growth of the process's resident-set high-water mark (``/proc/self/clear_refs`` reset), which
also sees allocator caching and page-fault behaviour.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from recbole_fmrl import atomic_write
from recbole_fmrl.environment import cpu_name
from recbole_fmrl.model.loss import (
    auto_chunk_size,
    auto_row_block,
    matryoshka_cross_entropy,
    matryoshka_cross_entropy_reference,
)

SIZES = {256: [8, 16, 32, 64, 128, 256], 64: [8, 16, 32, 64], 128: [8, 16, 32, 64, 128]}


def loadavg():
    try:
        return open("/proc/loadavg").read().split()[:3]
    except OSError:
        return ["?"]


def matmul_gflops(P, N, d, reps=5):
    a, b = torch.randn(P, d), torch.randn(d, N)
    out = torch.empty(P, N)
    g, e = torch.randn(P, N), torch.randn(N, d)
    best_f = best_b = float("inf")
    torch.mm(a, b, out=out)
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        best_f = min(best_f, time.perf_counter() - t)
        t = time.perf_counter()
        g @ e
        best_b = min(best_b, time.perf_counter() - t)
    flops = 2.0 * P * N * d
    return flops / best_f / 1e9, flops / best_b / 1e9


def peak_alloc_mb(fn):
    """Peak bytes held by tensors allocated during ``fn`` (torch profiler allocation events)."""
    from torch._C._profiler import _EventType
    from torch.profiler import profile

    with profile(profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size,
                           node.extra_fields.total_allocated))
    if not events:
        return 0.0
    events.sort()
    base = events[0][2] - events[0][1]
    return (max(e[2] for e in events) - base) / 2**20


def rss_peak_mb(fn):
    """Growth of VmHWM over VmRSS at entry (Linux only; None elsewhere)."""
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status("VmRSS")
    except OSError:
        return None
    fn()
    return status("VmHWM") - before


def parse_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--P", type=int, default=2800)
    ap.add_argument("--N", type=int, default=12101)
    ap.add_argument("--dims", default="64,256")
    ap.add_argument("--chunks", default="0", help="fused chunk sizes; 0 = auto")
    ap.add_argument("--rows", default="0", help="single-pass rows per block; 0 = auto; '' = none")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--out", default="results/loss_bench.md")
    return ap.parse_args()


def header_lines(args):
    return ["# Matryoshka cross-entropy benchmark", "",
            f"Command: `python -m benchmarks.bench_loss {' '.join(sys.argv[1:])}`", "",
            f"- CPU: {cpu_name()}, {os.cpu_count()} logical cores, "
            f"torch.set_num_threads({args.threads}), subnormals flushed to zero",
            f"- torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, float32",
            f"- P = {args.P} labelled positions, N = {args.N} items; loadavg at start {' '.join(loadavg())}"]


def loss_variants(d, sizes, args, chunks, row_blocks):
    """(label, fn) pairs for width d on fresh random inputs; each fn runs forward + backward once."""
    P, N = args.P, args.N
    hidden = torch.randn(P, d).requires_grad_()
    items = (torch.randn(N, d) * 0.1).requires_grad_()
    labels = torch.randint(0, N, (P,))

    def plain():
        return torch.autograd.grad(F.cross_entropy(hidden @ items.T, labels), [hidden, items])

    def reference():
        out = matryoshka_cross_entropy_reference(hidden, items, labels, sizes)
        return torch.autograd.grad(out.sum(), [hidden, items])

    def fused(c):
        def run():
            out = matryoshka_cross_entropy(hidden, items, labels, sizes, c)
            return torch.autograd.grad(out.sum(), [hidden, items])
        return run

    def single(r, native=None, sz=sizes):
        w = torch.full((len(sz),), 1.0 / len(sz))

        def run():
            out = matryoshka_cross_entropy(hidden, items, labels, sz, 0, weights=w, row_block=r, native=native)
            return torch.autograd.grad((out * w).sum(), [hidden, items])
        return run

    variants = [("plain CE, size d only", plain)]
    if not args.no_reference:
        variants.append((f"reference, all {len(sizes)} sizes", reference))
    for c in chunks:
        cc = auto_chunk_size(len(sizes), P, N) if c == 0 else c
        variants.append((f"fused, all {len(sizes)} sizes, chunk {cc}" + (" (auto)" if c == 0 else ""), fused(c)))
    for r in row_blocks:
        rr = auto_row_block(len(sizes), P, N, hidden_size=d) if r == 0 else r
        label = f"single-pass, all {len(sizes)} sizes, rows {rr}" + (" (auto)" if r == 0 else "")
        variants.append((label + ", compiled kernel", single(r)))
        variants.append((label + ", PyTorch ops", single(r, native=False)))
    if row_blocks:
        variants.append(("single-pass, size d only, compiled kernel", single(0, sz=[d])))
    return variants


def time_variants(variants, reps):
    """Milliseconds per call of each variant, after one warm-up call of every variant."""
    times = {name: [] for name, _ in variants}
    for _, fn in variants:
        fn()
    for r in range(reps):  # interleaved so that load changes hit all variants alike
        for name, fn in variants:
            if name.startswith("reference") and r >= 2:  # the slow reference: two repetitions suffice
                continue
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1e3)
    return times


def measure_width(d, args, chunks, row_blocks):
    """Table rows for width d (relative to plain CE) and the line with its matmul rates."""
    sizes = SIZES.get(d) or [d]
    gf_f, gf_b = matmul_gflops(args.P, args.N, d)
    variants = loss_variants(d, sizes, args, chunks, row_blocks)
    times = time_variants(variants, args.reps)
    mem = {name: (peak_alloc_mb(fn), rss_peak_mb(fn)) for name, fn in variants}
    base_t, base_m = min(times[variants[0][0]]), mem[variants[0][0]][0]
    rows = [(d, str(sizes), name, min(times[name]), statistics.median(times[name]), min(times[name]) / base_t,
             mem[name][0], mem[name][0] / base_m, mem[name][1]) for name, _ in variants]
    flop_ms = 3 * 2.0 * args.P * args.N * d / (gf_b * 1e9) * 1e3
    line = (f"- d = {d}: fp32 matmul {gf_f:.0f} GFLOP/s ([P,d]@[d,N] into a preallocated output), "
            f"{gf_b:.0f} GFLOP/s ([P,N]@[N,d]); the 3 matmuls of plain CE fwd+bwd at that rate: {flop_ms:.0f} ms")
    return rows, line


def table_lines(rows):
    lines = ["| d | sizes | variant | fwd+bwd ms (min) | median | time / plain | "
             "peak alloc MB | mem / plain | peak RSS growth MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for d, sizes, name, tmin, tmed, tr, m, mr, rss in rows:
        rss_s = "n/a" if rss is None else f"{rss:.0f}"
        lines.append(f"| {d} | {sizes} | {name} | {tmin:.0f} | {tmed:.0f} | {tr:.2f} | {m:.0f} | {mr:.2f} | {rss_s} |")
    return lines


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as in training (properties/overall.yaml: fmrl_flush_denormal)
    torch.manual_seed(0)
    chunks = [int(c) for c in args.chunks.split(",") if c]
    row_blocks = [int(r) for r in args.rows.split(",") if r]
    lines = header_lines(args)
    print("\n".join(lines), flush=True)
    rows = []
    for d in [int(x) for x in args.dims.split(",")]:
        width_rows, line = measure_width(d, args, chunks, row_blocks)
        rows += width_rows
        lines.append(line)
        print(line, flush=True)
    lines += ["", f"loadavg at end: {' '.join(loadavg())} (the machine is shared; times are the "
              f"min / median over {args.reps} interleaved repetitions)", ""]
    table = table_lines(rows)
    print("\n".join(table))
    atomic_write.write_text(args.out, "\n".join(lines + table) + "\n")


if __name__ == "__main__":
    main()
