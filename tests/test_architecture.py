"""The module graph points one way: ground floor <- data <- model <- train <- tune/deploy <- serve <- cli.

Every import counts, also the ones inside functions (a lazy import is still an arrow).
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {  # recbole_fmrl sub-package or module -> layer; an import may only go to a lower or equal layer
    "paths": 0, "environment": 0, "atomic_write": 0, "errors": 0,
    "data": 1, "model": 2, "train": 3, "tune": 4, "deploy": 4, "serve": 5, "cli": 6,
}
# dataset_tools may read and write the plugin's feature format and ask which tables a modality reads (one home
# for that: a copy of the list in dataset_tools once left the hybrid text_id out), nothing else of it
DATASET_TOOLS_MAY_USE = {"recbole_fmrl.data.features", "recbole_fmrl.data.modality", "recbole_fmrl.atomic_write",
                         "recbole_fmrl.paths"}


def imports(path):
    """Every absolute module name a file imports (top level and inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def layer_of(module):
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_plugin_module_has_a_layer():
    for path in (ROOT / "recbole_fmrl").rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        if rel.name == "__init__" and len(rel.parts) == 2:
            continue
        assert layer_of(".".join(rel.parts)) is not None, f"{rel}: not in a layer of tests/test_architecture.py"


def test_imports_point_down_and_never_reach_dataset_tools():
    wrong = []
    for path in (ROOT / "recbole_fmrl").rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        own = layer_of(".".join(rel.parts))
        for name in imports(path):
            if name.split(".")[0] == "dataset_tools":
                wrong.append(f"{rel} imports {name}")
            target = layer_of(name) if name.startswith("recbole_fmrl.") else None
            if own is not None and target is not None and target > own:
                wrong.append(f"{rel} (layer {own}) imports {name} (layer {target})")
            if rel.parts[1] in ("tune", "deploy") and name.split(".")[1:2] == [{"tune": "deploy", "deploy": "tune"}[rel.parts[1]]]:
                wrong.append(f"{rel} imports its sibling {name}")
    assert not wrong, "\n".join(wrong)


def test_dataset_tools_use_only_the_feature_format():
    wrong = []
    for path in (ROOT / "dataset_tools").rglob("*.py"):
        for name in imports(path):
            if name.startswith("recbole_fmrl") and not any(name == m or name.startswith(m + ".") for m in DATASET_TOOLS_MAY_USE):
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "\n".join(wrong)
