"""Efficiency of Matryoshka training: all sizes vs the largest alone vs independent training vs SASRec.

Every variant runs in its own subprocess (so peak memory is its own) on the same dataset and
machine, in one invocation; the report goes to ``results/efficiency.md`` (+ ``.json``).

    python -m benchmarks.efficiency --dataset amazon-beauty --data-path data --hidden-size 256

Per variant: mean time of a training step (forward, backward, optimizer) over ``--steps`` steps
after warm-up, steps per epoch, the epoch time (measured with --full-epoch, else steps x step
time), peak resident memory growth during training, FLOPs of one step counted by
``torch.utils.flop_counter`` and the machine's fp32 GEMM rate measured in the same process.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from recbole_fmrl.environment import set_offline_defaults

ROOT = Path(__file__).resolve().parents[1]


def variants(d):
    """Name -> (model, config overrides). "plain" rows train one size with plain cross-entropy on
    materialised logits (the issue's baseline: what training a single model normally costs);
    "fused" rows train one size with this project's fused single-pass loss (a stricter baseline)."""
    from recbole_fmrl.model.nested import default_sizes

    sizes = default_sizes(d)
    plain, fused = {"fmrl_loss_chunk_size": -1}, {}
    out = {"all-sizes": ("FMRLRec", {"hidden_size": d}),
           "all-sizes-torch": ("FMRLRec", {"hidden_size": d, "fmrl_native_loss": False}),
           "largest-plain": ("FMRLRec", {"hidden_size": d, "fmrl_sizes": [d], **plain}),
           "largest-fused": ("FMRLRec", {"hidden_size": d, "fmrl_sizes": [d], **fused})}
    for m in sizes[:-1]:
        out[f"alone-{m}-plain"] = ("FMRLRec", {"hidden_size": m, "fmrl_sizes": [m], **plain})
        out[f"alone-{m}-fused"] = ("FMRLRec", {"hidden_size": m, "fmrl_sizes": [m], **fused})
    out["SASRec"] = ("SASRec", {"train_neg_sample_args": None})  # RecBole: CE needs no negatives
    return out, sizes


def rss_hwm_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1])
    return 0


def reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets the resident-set high-water mark
    except OSError:
        pass


def gemm_rate(device, n=2048, reps=5):
    """Best of ``reps`` timed n x n fp32 GEMMs: the machine's rate, not one noisy sample."""
    import torch

    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def sync(device):
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _inplace_addmm_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs):
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def flop_counter():
    """``FlopCounterMode`` that also counts in-place ``addmm_``: torch's registry lacks it, and the
    fused Matryoshka loss does almost all of its GEMMs in place (without it a step's count missed
    two thirds of its FLOPs)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _inplace_addmm_flops})


def worker(args):
    """Measure one variant; print one JSON line."""
    import torch

    from recbole_fmrl.train.driver import prepare

    torch.set_num_threads(args.threads)
    model, overrides = json.loads(args.worker)
    cfg = {"data_path": args.data_path, "epochs": 1, "show_progress": False, "state": "ERROR",
           "fmrl_output_dir": args.output_dir, "use_gpu": args.device == "cuda", "seed": 2020, **overrides}
    if model == "FMRLRec" and args.modality:
        cfg["fmrl_modality"] = args.modality
    config, net, trainer, (train, _, _) = prepare(model, args.dataset, config_dict=cfg, log=False)
    device = config["device"]
    net.train()
    batches = iter(train)

    def step():
        nonlocal batches
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(train)
            batch = next(batches)
        batch = batch.to(device)
        trainer.optimizer.zero_grad()
        losses = net.calculate_loss(batch)
        loss = sum(losses) if isinstance(losses, tuple) else losses
        loss.backward()
        trainer.optimizer.step()

    step()  # warm-up: allocator, lazy inits
    with flop_counter() as counter:
        step()
    flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_kib = rss_hwm_kib()
    reset_hwm()
    base_kib = min(base_kib, rss_hwm_kib())
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    step_s = (time.perf_counter() - start) / args.steps
    peak_kib = rss_hwm_kib() - base_kib
    breakdown = time_breakdown(step, device)
    epoch_s = None
    if args.full_epoch:
        start = time.perf_counter()
        trainer._train_epoch(train, 0, show_progress=False)
        sync(device)
        epoch_s = time.perf_counter() - start
    params = net.nested_parameter_count() if hasattr(net, "nested_parameter_count") else \
        sum(p.numel() for p in net.parameters() if p.requires_grad)
    print("RESULT " + json.dumps({
        "step_s": step_s, "steps_per_epoch": len(train), "epoch_s": epoch_s, "flops_per_step": flops,
        "peak_rss_mib": peak_kib / 1024, "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda" else None, "gemm_flops": gemm_rate(device), "params": params,
        "train_samples": len(train.dataset) if hasattr(train, "dataset") else None,
        "batch_size": config["train_batch_size"], "breakdown_s": breakdown}))


GEMM_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::addbmm"}


def time_breakdown(step, device, steps=2):
    """Seconds per step in GEMMs, in exp (the per-size softmaxes), in the compiled loss kernel and in
    everything else, from the
    profiler's self CPU time (single-threaded: equal to wall time). CPU only."""
    if device.type != "cpu":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    out = {"gemm": 0.0, "exp": 0.0, "kernel": 0.0, "other": 0.0}
    for event in prof.key_averages():
        if event.key.startswith("fmrl::"):  # the compiled loss kernel (its range has no aten children)
            kind = "kernel"
        elif not event.key.startswith("aten::"):
            continue  # Python-level ranges (autograd Functions) would count their children twice
        else:
            kind = "gemm" if event.key in GEMM_OPS else "exp" if event.key in ("aten::exp", "aten::exp_") else "other"
        out[kind] += event.self_cpu_time_total / 1e6 / steps
    return out


def hardware(device):
    from recbole_fmrl.environment import describe_machine

    return describe_machine(device)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="amazon-beauty")
    p.add_argument("--data-path", default=str(ROOT / "data"))
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--modality", default="text", help="FMRLRec modality (Beauty has text only offline)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--full-epoch", action="store_true", help="also time one full epoch per variant")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every variant this many times, interleaved; each keeps its fastest round")
    p.add_argument("--output-dir", default=str(ROOT / "runs" / "efficiency"))
    p.add_argument("--out", default=str(ROOT / "results" / "efficiency.md"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    import torch

    table, sizes = variants(args.hidden_size)
    names = [n for n in table if not args.only or n in args.only]
    results = {}
    for rnd in range(args.rounds):
        for i, name in enumerate(names):
            print(f"[round {rnd + 1}/{args.rounds}, {i + 1}/{len(names)}] {name} ...", flush=True)
            r = run_variant(args, table[name])
            if "error" in r:
                results.setdefault(name, r)
                continue
            r["rounds_step_s"] = results.get(name, {}).get("rounds_step_s", []) + [r["step_s"]]
            if "error" in results.get(name, {}) or r["step_s"] <= results.get(name, {}).get("step_s", float("inf")):
                results[name] = r
            else:
                results[name]["rounds_step_s"] = r["rounds_step_s"]
            print(f"    step {r['step_s']*1e3:.0f} ms x {r['steps_per_epoch']} steps, peak +{r['peak_rss_mib']:.0f} MiB", flush=True)
    rate = max((r["gemm_flops"] for r in results.values() if "gemm_flops" in r), default=None)
    for r in results.values():  # one machine rate for every FLOP bound: the best seen in the run
        if "gemm_flops" in r:
            r["process_gemm_flops"], r["gemm_flops"] = r["gemm_flops"], rate
    report(args, results, sizes, hardware(args.device), torch.__version__)


def run_variant(args, spec):
    cmd = [sys.executable, "-m", "benchmarks.efficiency", "--worker", json.dumps(spec), "--dataset", args.dataset,
           "--data-path", args.data_path, "--modality", args.modality, "--steps", str(args.steps),
           "--device", args.device, "--threads", str(args.threads), "--output-dir", args.output_dir] + \
          (["--full-epoch"] if args.full_epoch else [])
    set_offline_defaults()  # the child inherits them
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    line = next((out for out in proc.stdout.splitlines() if out.startswith("RESULT ")), None)
    if line is None:
        print(proc.stdout[-2000:], proc.stderr[-4000:])
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(line[7:])


def epoch_time(r):
    return r["epoch_s"] if r.get("epoch_s") else r["step_s"] * r["steps_per_epoch"]


def peak_mib(r):
    return r["cuda_peak_mib"] if r.get("cuda_peak_mib") is not None else r["peak_rss_mib"]


def report(args, results, sizes, hw, torch_version):
    ok = {k: v for k, v in results.items() if "error" not in v}
    lines = [f"# Efficiency: Matryoshka training on {args.dataset} (d = {args.hidden_size})", "",
             f"Command: `python -m benchmarks.efficiency {' '.join(sys.argv[1:])}`  ",
             f"Hardware: {hw}; device {args.device}; {args.threads} threads; torch {torch_version}  ",
             f"Date: {time.strftime('%Y-%m-%d %H:%M')}; each variant in its own process, {args.steps} timed steps "
             f"after warm-up, {args.rounds} interleaved round(s), the fastest kept; epoch = "
             f"{'one measured epoch' if args.full_epoch else 'steps/epoch x mean step time'}; FLOP bounds at the "
             f"best fp32 GEMM rate measured in the run.", "",
             "| variant | params | batch | steps/epoch | step (ms) | epoch (s) | GFLOP/step | FLOP-bound epoch (s) | x bound | peak mem (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} |||||||||")
            continue
        bound = r["flops_per_step"] * r["steps_per_epoch"] / r["gemm_flops"]
        mem = peak_mib(r)
        lines.append(f"| {name} | {r['params']:,} | {r['batch_size']} | {r['steps_per_epoch']} | {r['step_s']*1e3:.0f} | "
                     f"{epoch_time(r):.1f} | {r['flops_per_step']/1e9:.1f} | {bound:.1f} | {epoch_time(r)/bound:.2f} | {mem:.0f} |")
    if "all-sizes" in ok:
        a = ok["all-sizes"]
        lines += ["", "## Ratios (targets in brackets)", ""]
        for kind, what in (("plain", "plain CE on materialised logits"), ("fused", "this project's fused loss")):
            largest = ok.get(f"largest-{kind}")
            if largest is None:
                continue
            lines.append(f"- all sizes / largest alone ({what}), epoch time: **{epoch_time(a)/epoch_time(largest):.2f}** "
                         f"(<= 1.2); peak memory: **{peak_mib(a)/max(peak_mib(largest), 1e-9):.2f}** (<= 1.2)")
            alone = [ok.get(f"alone-{m}-{kind}") for m in sizes[:-1]]
            if all(alone):
                total = sum(epoch_time(r) for r in alone) + epoch_time(largest)
                lines.append(f"- all sizes / independent training of every size ({what}, sum of {len(sizes)} "
                             f"epochs): **{epoch_time(a)/total:.2f}** (<= 0.4)")
        bound = a["flops_per_step"] * a["steps_per_epoch"] / a["gemm_flops"]
        lines.append(f"- all-sizes epoch / its FLOP bound: **{epoch_time(a)/bound:.2f}** (<= 2); machine GEMM rate "
                     f"{a['gemm_flops']/1e9:.0f} GFLOP/s (best 2048^3 fp32 GEMM seen in the run)")
        if "all-sizes-torch" in ok:
            lines.append(f"- compiled loss kernel vs the same loss in PyTorch ops, epoch time: "
                         f"**{epoch_time(a)/epoch_time(ok['all-sizes-torch']):.2f}**")
        if "SASRec" in ok:
            lines.append(f"- FMRLRec all-sizes epoch / RecBole SASRec epoch: **{epoch_time(a)/epoch_time(ok['SASRec']):.2f}** (< 1)")
    parts = {k: v["breakdown_s"] for k, v in ok.items() if v.get("breakdown_s")}
    if parts:
        lines += ["", "## Where a step's time goes (profiler, self CPU time per step)", "",
                  "| variant | GEMM (ms) | exp (ms) | loss kernel (ms) | other ops (ms) |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {b['gemm']*1e3:.0f} | {b['exp']*1e3:.0f} | {b.get('kernel', 0)*1e3:.0f} | {b['other']*1e3:.0f} |"
                  for k, b in parts.items()]
        lines += ["", f"![step time breakdown]({Path(args.out).with_suffix('.png').name})"]
        plot_breakdown(parts, Path(args.out).with_suffix(".png"), args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines))


def plot_breakdown(parts, path, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(parts)
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2, 3.6))
    bottom = [0.0] * len(names)
    for kind, color in (("gemm", "#4c72b0"), ("exp", "#dd8452"), ("kernel", "#55a868"), ("other", "#8c8c8c")):
        vals = [parts[n].get(kind, 0.0) * 1e3 for n in names]
        ax.bar(names, vals, bottom=bottom, color=color, label=kind)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("ms per training step")
    ax.set_title(f"{args.dataset}, d = {args.hidden_size}, {args.device}, {args.threads} thread(s)")
    ax.legend()
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
