"""Process settings every entry point shares: offline model hubs, numerics, the machine's name."""
import os
import platform

# Variables a worker process (Ray trial, benchmark row, DDP rank) must inherit from its driver.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "RECBOLE_FMRL_CACHE", "FMRL_NATIVE")


def set_offline_defaults() -> None:
    """No model hub at run time unless the user says otherwise (code that fetches weights fails offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def forwarded_env() -> dict:
    """The subset of this process's environment that worker processes need."""
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


def set_numerics(flush_denormal: bool) -> None:
    """Process-wide numeric settings of a run."""
    import torch

    # A sharp softmax leaves most of its [P, N] gradient subnormal, and x86 GEMMs on subnormal
    # floats crawl (results/efficiency.md); flushing them to zero changes no metric.
    torch.set_flush_denormal(bool(flush_denormal))


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def describe_machine(device: str = "cpu") -> str:
    """One line for reports: the GPU's name on cuda, else the CPU's name and core count."""
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    return f"{cpu_name()}, {os.cpu_count()} cores"
