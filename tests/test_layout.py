"""The shape of the source tree: the run-folder layout spelled in one module, imports that only run down the
pipeline, no stage borrowing from a sibling stage, and no module globals that switch behaviour."""

import ast
from pathlib import Path

from llmscratch import runs

SRC = Path(__file__).resolve().parents[1] / "src" / "llmscratch"

# Every file name of our layout that runs.py defines.
LAYOUT_NAMES = {value for name, value in vars(runs).items()
                if name.isupper() and isinstance(value, str) and "." in value}


def modules():
    for path in sorted(SRC.rglob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"))


def dotted(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.Module, module: str) -> set[str]:
    """Absolute names of the llmscratch modules a module imports (anywhere in it, lazily too)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = module.split(".")[: -node.level + (1 if module.endswith("__init__") else 0)] if node.level else []
            found.add(".".join(base + ([node.module] if node.module else [])))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("llmscratch")}


def test_the_layout_names_are_spelled_in_runs_only():
    assert {"model.safetensors", "config.json", "train_state.pt", "adapter_config.json",
            "prompt_style.json", "labels.json", "metrics.csv"} <= LAYOUT_NAMES
    offenders = []
    for path, tree in modules():
        if path.name == "runs.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in LAYOUT_NAMES:
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno} {node.value!r}")
    assert not offenders, "file names of the layout belong to llmscratch.runs: " + "; ".join(offenders)


# module prefix → prefixes it must never import (the pipeline runs text → tokenizer → data → model → train →
# finetune → generate/serve; shared foundations sit below everything).
FORBIDDEN = {
    "llmscratch.runtime": ("llmscratch.model", "llmscratch.train", "llmscratch.finetune", "llmscratch.cli"),
    "llmscratch.runs": ("llmscratch.model", "llmscratch.train", "llmscratch.finetune", "llmscratch.cli"),
    "llmscratch.errors": ("llmscratch.",),
    "llmscratch.fileio": ("llmscratch.model", "llmscratch.train", "llmscratch.finetune"),
    "llmscratch.tokenizer": ("llmscratch.model", "llmscratch.train", "llmscratch.finetune", "llmscratch.cli"),
    "llmscratch.data": ("llmscratch.model", "llmscratch.train", "llmscratch.finetune", "llmscratch.cli"),
    "llmscratch.model": ("llmscratch.train", "llmscratch.finetune", "llmscratch.cli", "llmscratch.lora"),
    "llmscratch.train": ("llmscratch.finetune", "llmscratch.cli", "llmscratch.eval"),
    "llmscratch.finetune": ("llmscratch.cli",),
    "llmscratch.lora": ("llmscratch.finetune", "llmscratch.cli", "llmscratch.train"),
    "llmscratch.weights": ("llmscratch.finetune", "llmscratch.cli", "llmscratch.train"),
}
STAGES = ("llmscratch.finetune.classify", "llmscratch.finetune.instruct", "llmscratch.finetune.dpo")


def test_imports_run_down_the_pipeline():
    offenders = []
    for path, tree in modules():
        module = dotted(path)
        for prefix, banned in FORBIDDEN.items():
            if module == prefix or module.startswith(prefix + "."):
                offenders += [f"{module} imports {m}" for m in imported(tree, module)
                              if m.startswith(banned) and not m.startswith(prefix)]
        if module in STAGES:  # a stage never borrows from a sibling stage: shared code moves down
            offenders += [f"{module} imports {m}" for m in imported(tree, module)
                          if m.startswith(STAGES) and not m.startswith(module)]
    assert not offenders, "; ".join(offenders)


def test_no_module_global_is_assigned_from_outside_its_module():
    """Behaviour is configured (model options, arguments), not switched by assigning another module's global:
    nothing under src/, tests/ or benchmarks/ writes `some_module.NAME = ...` into a llmscratch module."""
    root = SRC.parents[1]
    offenders = []
    for folder in ("src", "tests", "benchmarks"):
        for path in sorted((root / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            aliases = set()  # names bound to llmscratch modules in this file
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llmscratch"):
                    aliases.update(a.asname or a.name for a in node.names)
                elif isinstance(node, ast.Import):
                    aliases.update((a.asname or a.name).split(".")[0] for a in node.names
                                   if a.name.startswith("llmscratch"))
            for node in ast.walk(tree):
                targets = node.targets if isinstance(node, ast.Assign) else (
                    [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
                for t in targets:
                    for el in (t.elts if isinstance(t, ast.Tuple) else [t]):
                        if (isinstance(el, ast.Attribute) and isinstance(el.value, ast.Name)
                                and el.value.id in aliases and el.attr.isupper()):
                            offenders.append(f"{path.relative_to(root)}:{node.lineno} {el.value.id}.{el.attr}")
    assert not offenders, "; ".join(offenders)
