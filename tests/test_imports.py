"""The project's import graph has no circles: read from the source (ast), every import of every module
counted, lazy ones inside functions included (only `if TYPE_CHECKING:` blocks, which never run, are not).

Two levels: no module imports itself through others, and the folders (top-level packages) depend on each
other one way only. configs/ is a folder of separate modules: configs.errors is the leaf every folder
uses, and configs.schema, which the others may use, composes the groups' schemas that live with their code
(model/config.py, data/config.py, parallel/config.py, eval/config.py), leaves of their folders: that
composition is the one dependency the one-way rule leaves out. model/ in particular never reaches parallel/ or checkpoints/ (checkpoints build models; the engines call
down into checkpoints)."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["bench", "checkpoints", "configs", "data", "eval", "kernels", "model", "parallel", "scripts", "training"]
ENTRY_POINTS = ["train.py"]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    files = [p for package in PACKAGES for p in (REPO / package).rglob("*.py")] + [REPO / f for f in ENTRY_POINTS]
    return {module_name(path): path for path in files}


def runtime_imports(tree: ast.AST, package: str) -> list[str]:
    """Dotted names a module imports anywhere in its body (functions included), TYPE_CHECKING blocks left out;
    `from a import b` gives a.b (resolved to a module or not by the caller)."""
    names = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.extend(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (a name resolves to its longest prefix that is a module)."""
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for imported in runtime_imports(ast.parse(path.read_text(), str(path)), package):
            parts = imported.split(".")
            for end in range(len(parts), 0, -1):
                if ".".join(parts[:end]) in modules:
                    targets.add(".".join(parts[:end]))
                    break
        graph[name] = targets - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def folder(module: str) -> str:
    """The unit the one-way rule applies to: the top-level package, or the module itself in configs/."""
    top = module.split(".")[0]
    return module if top == "configs" else top


def composes_a_schema(module: str, target: str) -> bool:
    return module == "configs.schema" and target.endswith(".config")


def describe(component: list[str], graph: dict[str, set[str]]) -> str:
    inside = set(component)
    return "; ".join(f"{a} -> {', '.join(sorted(graph[a] & inside))}" for a in component if graph[a] & inside)


def test_the_graph_sees_lazy_imports_and_skips_type_checking_blocks():
    tree = ast.parse("import a\nfrom b import c\ndef f():\n    from d.e import g\n"
                     "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import h\n")
    assert runtime_imports(tree, "x") == ["a", "b.c", "d.e.g", "typing.TYPE_CHECKING"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_itself_through_others():
    graph = import_graph()
    assert len(graph) > 50, f"found only {len(graph)} modules: is PACKAGES right?"
    found = cycles(graph)
    assert not found, "import circles: " + " | ".join(describe(c, graph) for c in found)


def test_folders_depend_on_each_other_one_way():
    graph = import_graph()
    folders: dict[str, set[str]] = {}
    for module, targets in graph.items():
        folders.setdefault(folder(module), set()).update(
            folder(t) for t in targets if folder(t) != folder(module) and not composes_a_schema(module, t))
    found = cycles(folders)
    assert not found, "folders that import each other: " + " | ".join(
        describe(c, folders) + " (modules: " + "; ".join(
            f"{m} -> {t}" for m in graph for t in graph[m] if folder(m) in c and folder(t) in c and folder(m) != folder(t))
        + ")" for c in found)


@pytest.mark.parametrize("low, high", [("model", "parallel"), ("model", "checkpoints"), ("kernels", "model"),
                                       ("parallel", "bench"), ("model", "bench")])
def test_lower_folders_never_reach_higher_ones(low, high):
    graph = import_graph()
    reached, todo = set(), [m for m in graph if m.split(".")[0] == low]
    while todo:
        module = todo.pop()
        for target in graph[module]:
            if target not in reached:
                reached.add(target)
                todo.append(target)
    assert not [m for m in reached if m.split(".")[0] == high], f"{low}/ reaches {high}/"
