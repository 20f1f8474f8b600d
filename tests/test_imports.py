"""hogwild's modules import one another without a circle.

Every `import` in a module counts, the ones inside functions too (a lazy import hides a circle, it does not
remove it); only imports under `if TYPE_CHECKING:` are exempt, since they never run. `from hogwild.x import y`
counts as an edge to hogwild.x.y when y is a submodule and to hogwild.x otherwise; importing a package is an
edge to its __init__.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "hogwild"


def module_names() -> dict[str, Path]:
    names = {}
    for path in ROOT.rglob("*.py"):
        parts = ("hogwild", *path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(tree: ast.AST):
    """Every Import/ImportFrom node in the tree, skipping the bodies of `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def graph() -> dict[str, set[str]]:
    names = module_names()
    edges: dict[str, set[str]] = {name: set() for name in names}
    for name, path in names.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module
                # `from hogwild.x import y`: hogwild.x.y when y is a submodule, else hogwild.x
                targets = [f"{source}.{alias.name}" for alias in node.names]
            for target in targets:
                # the longest hogwild module a name starts with is the edge (`import hogwild.a.b`: hogwild.a.b)
                while target and target not in names:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges[name].add(target)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of module names (first == last), or None. Iterative DFS with colours."""
    colour = {name: 0 for name in edges}  # 0 unseen, 1 on the stack, 2 done
    for start in sorted(edges):
        if colour[start]:
            continue
        path = [start]
        iters = [iter(sorted(edges[start]))]
        colour[start] = 1
        while iters:
            child = next(iters[-1], None)
            if child is None:
                colour[path.pop()] = 2
                iters.pop()
            elif colour[child] == 1:
                return path[path.index(child) :] + [child]
            elif colour[child] == 0:
                colour[child] = 1
                path.append(child)
                iters.append(iter(sorted(edges[child])))
    return None


def test_graph_resolves_submodules_and_relative_imports():
    edges = graph()
    assert "hogwild.cli" in edges and "hogwild.model.registry" in edges
    # every module's edges stay inside hogwild
    assert all(target.startswith("hogwild") for targets in edges.values() for target in targets)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) in (["a", "b", "c", "a"],)
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles():
    edges = graph()
    cycles = []
    # report every cycle, one at a time: break the found one's closing edge and look again
    while (cycle := find_cycle(edges)) is not None:
        cycles.append(" -> ".join(cycle))
        edges[cycle[-2]].discard(cycle[-1])
    assert not cycles, "import cycles in hogwild/:\n" + "\n".join(cycles)
