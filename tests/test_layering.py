"""The kernel reads top-down: the core under data/ and train/, those under the CLI, and no import circles.

Every import statement counts, wherever it stands (a module's top, inside a function, under
``TYPE_CHECKING``): an import moved into a function hides a circle from Python, not from a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import dharma_kernel

KERNEL = Path(dharma_kernel.__file__).parent
# The modules everything else builds on (ARCHITECTURE.md): the module contract and the model.
CORE = ("protocol", "blocks", "families", "stack", "model", "backbone", "manifest", "registry")
UPPER = ("data", "train", "serve", "cli")  # packages the core may not reach
# These drive the CLI from above: `python -m dharma_kernel` and the tests' run_cli.
CLI_USERS = ("__main__", "testing")


def kernel_modules(root: Path) -> dict[str, Path]:
    """Each module of the package at ``root`` by dotted name relative to it ("data.packing"; "" is
    the package itself, "cli" a subpackage's ``__init__``)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """Which modules of the package at ``root`` each of its modules imports."""
    modules = kernel_modules(root)

    def known(name: str) -> str:
        while name not in modules:  # `from .data import DataReport` imports the package "data"
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        package = [part for part in package if part]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == root.name]
                targets = [target.partition(".")[2] for target in targets]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                elif (node.module or "").split(".")[0] == root.name:
                    base = []
                else:
                    continue
                module = ".".join([*base, *([node.module] if node.module else [])])
                if node.module and not node.level:
                    module = module.partition(".")[2]
                # `from . import registry` imports a module; `from .cli import app` a name of one
                targets = [f"{module}.{a.name}".strip(".") for a in node.names]
                targets = [t if t in modules else module for t in targets]
            found.update(known(target) for target in targets)
        graph[name] = found - {name}
    return graph


def reach(graph: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """Every module ``start`` imports directly or not, each with the chain of imports that gets there."""
    paths, todo = {start: [start]}, [start]
    while todo:
        current = todo.pop()
        for target in sorted(graph[current]):
            if target not in paths:
                paths[target] = [*paths[current], target]
                todo.append(target)
    return paths


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest import circle through each set of modules that import each other ([a, b, a])."""
    found = []
    for name in sorted(graph):
        onward = (reach(graph, target) for target in sorted(graph[name]))
        back = [[name, *paths[name]] for paths in onward if name in paths]
        if back:
            found.append(min(back, key=len))
    unique: dict[frozenset[str], list[str]] = {}
    for chain in sorted(found, key=len):
        unique.setdefault(frozenset(chain), chain)
    return sorted(unique.values(), key=lambda chain: (len(chain), chain))


def layer_breaks(graph: dict[str, set[str]]) -> list[str]:
    """Each import that goes up a layer, as the chain of imports that leads to it."""

    def top(name: str) -> str:
        return name.split(".")[0]

    breaks = []
    for name in CORE:
        for target, chain in reach(graph, name).items():
            if top(target) in UPPER:
                breaks.append(" -> ".join(chain))
    for name in graph:
        if top(name) in ("data", "train"):
            for target, chain in reach(graph, name).items():
                if top(target) in ("cli", "serve"):
                    breaks.append(" -> ".join(chain))
        elif top(name) != "cli" and name not in CLI_USERS:
            breaks += [f"{name} -> {target}" for target in graph[name] if top(target) == "cli"]
    return sorted(breaks)


def test_the_kernel_has_no_import_circle():
    found = [" -> ".join(chain) for chain in circles(import_graph(KERNEL))]
    assert not found, "import circles:\n" + "\n".join(found)


def test_the_core_imports_no_higher_layer_and_only_the_top_imports_the_cli():
    graph = import_graph(KERNEL)
    assert set(CORE) | {"data", "train", "cli", "serve"} <= set(graph)
    found = layer_breaks(graph)
    assert not found, "imports up a layer:\n" + "\n".join(found)


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checks_find_a_hidden_circle_and_an_import_up_a_layer(tmp_path):
    # The shapes the kernel had before issue #15: a circle behind a function-local import, one
    # through a package's __init__, the core reaching the CLI through a module between, and train/
    # reaching it; testing.py may drive the CLI.
    package = write_package(tmp_path / "dharma_kernel", {
        "__init__.py": "",
        "model.py": "from .hub import card\n",
        "hub.py": "def card():\n    from .cli.train import main\n",
        "concepts.py": "def encode():\n    from .data.tokenizer import pad_id\n",
        "data/__init__.py": "from .clean import clean\n",
        "data/clean.py": "",
        "data/tokenizer.py": "from ..concepts import encode\nimport dharma_kernel.data.clean\n",
        "cli/__init__.py": "from . import train  # registers\n",
        "cli/train.py": "from ..cli import app\n",
        "train/__init__.py": "",
        "train/loop.py": "from ..cli.output import out\n",
        "testing.py": "from .cli import main\n",
    })  # fmt: skip
    graph = import_graph(package)

    assert graph["data.tokenizer"] == {"concepts", "data.clean"}
    assert graph["cli.train"] == {"cli"}
    assert circles(graph) == [["cli", "cli.train", "cli"], ["concepts", "data.tokenizer", "concepts"]]
    assert layer_breaks({**graph, **{name: set() for name in CORE if name not in graph}}) == [
        "hub -> cli.train",
        "model -> hub -> cli.train",
        "model -> hub -> cli.train -> cli",
        "train.loop -> cli",
        "train.loop -> cli -> cli.train",
    ]
