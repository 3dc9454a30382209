"""The package's layers (README, "How the code is laid out"): every import of utils/ points down, function-level
imports included, so no two modules import each other, however far round; and the model file knows nothing of
hubs, stand-ins, data or paths."""

from __future__ import annotations

import ast

from conftest import ROOT

# From the bottom up; a module may import its own layer's modules and those below, never above.
LAYERS = {
    "leaf": {"errors", "files", "images", "records", "mapper", "runtime", "paths", "standin_names", "bench_clipcap"},
    "config": {"config", "controls"},
    "data": {"csvtext", "shards", "embedded", "readers", "download", "hub_datasets"},
    "model": {"standins", "standin_words", "standin_clip", "standin_text", "sources", "clip_encoder", "model", "bundle_files", "bundle", "captioner", "translate"},
    "run": {"schedule", "checkpoints", "monitors", "features", "training_run", "training", "launch"},
    "judge": {"metrics", "clipscore", "evaluation", "calibration"},
    "front": {"__main__", "course", "setup", "plots", "widgets", "serve", "share", "clipcap_import", "bench",
              "bench_training", "bench_gpu"},
}
RANK = {module: rank for rank, modules in enumerate(LAYERS.values()) for module in modules}


def imports() -> dict[str, set[str]]:
    """module -> the utils modules it imports anywhere in its file (top, functions, TYPE_CHECKING blocks)."""
    modules = {p.stem: p for p in (ROOT / "utils").glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {m for m in [node.module or "", *(a.name for a in node.names)] if m in modules}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("utils."):
                found.add(node.module.split(".")[1])
        graph[name] = found - {name}
    return graph


def test_every_module_has_a_layer():
    assert set(imports()) == set(RANK), "a new module: give it a layer here and in README's picture"


def test_imports_point_down_the_layers():
    upward = [f"{m} ({layer_of(m)}) imports {d} ({layer_of(d)})" for m, deps in imports().items() for d in deps
              if RANK[d] > RANK[m]]
    assert not upward, upward


def test_no_import_circle_function_level_imports_included():
    graph = imports()

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    assert not sorted(m for m in graph if m in reach(m))


def test_the_model_file_imports_only_torch_and_the_layers_below():
    assert imports()["model"] <= {"config", "mapper", "runtime", "errors"}


def layer_of(module: str) -> str:
    return next(layer for layer, modules in LAYERS.items() if module in modules)


def test_readmes_picture_of_the_layers_is_this_table():
    """README draws the layers, top first, a line each: `layer  module  module ...`; it is LAYERS."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    drawn = {}
    for line in text.splitlines():
        name, *modules = line.split() or [""]
        if name in LAYERS and modules and all(m.isidentifier() for m in modules):
            drawn[name] = set(modules)
    assert drawn == LAYERS
    assert list(drawn) == list(LAYERS)[::-1], "README draws the top layer first"
