"""The package's imports run one way, and its face does not pay for torch.

Every ``aim_llava`` import in every module (at the top or inside a function) is an edge of a
graph; importing ``a.b.c`` also runs ``a.b``'s ``__init__``. The graph must have no cycle, and the
model must not reach the layers above it (configs and methods, cost reports, the pipeline).
"""

import ast
import subprocess
import sys
from pathlib import Path

import aim_llava

PACKAGE = Path(aim_llava.__file__).resolve().parent


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imported(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("aim_llava"):
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    names = module_names()
    known = set(names)
    graph = {}
    for name, path in names.items():
        edges = imported(ast.parse(path.read_text()), name, path.name == "__init__.py", known)
        with_parents = set()
        for target in edges:
            parts = target.split(".")
            with_parents |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        graph[name] = {t for t in with_parents if t != name and not name.startswith(t + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        for nxt in graph.get(node, ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_imports_have_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_model_does_not_reach_the_layers_above_it():
    graph = import_graph()
    above = {"aim_llava.reduction.config", "aim_llava.reduction.methods", "aim_llava.reduction.budget",
             "aim_llava.flops", "aim_llava.pipeline", "aim_llava.cli", "aim_llava.bench", "aim_llava.architectures"}
    for module in ("aim_llava.model.language_model.llava_qwen", "aim_llava.model.llava_arch"):
        assert not reachable(graph, module) & above, module
    # methods see the interfaces and the cost formulas, not the model
    for module in ("aim_llava.reduction.methods.aim", "aim_llava.reduction.methods.fitprune"):
        assert "aim_llava.model.language_model.llava_qwen" not in reachable(graph, module)


def test_package_face_and_plugin_manifest_do_not_import_torch():
    code = ("import sys, aim_llava, aim_llava.lmms_eval_manifest, aim_llava.cli; "
            "aim_llava.cli.build_parser(); print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
