"""Where the plugin's own files live: its bundled YAML properties and its cache folder."""
import os
from pathlib import Path


def properties_dir() -> Path:
    """The plugin's properties/: bundled in the package when installed, else the source tree's."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "properties", here.parent / "properties"):
        if (candidate / "overall.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"recbole_fmrl properties/ not found next to {here}")


def default_cache_dir() -> Path:
    """Features, encoders and compiled kernels: ``$RECBOLE_FMRL_CACHE`` or ``~/.cache/recbole_fmrl``."""
    return Path(os.environ.get("RECBOLE_FMRL_CACHE", Path.home() / ".cache" / "recbole_fmrl"))
