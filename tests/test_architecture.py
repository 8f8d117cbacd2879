"""The rooms of docs/architecture.md: no module imports a room above its own, and no circles."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fabdeploy"
ROOMS = [  # top to bottom, as docs/architecture.md lists them
    {"__init__", "__main__", "tasks"},
    {"fleet", "hostinfo", "commands"},
    {"phases"},
    {"remote", "session"},
    {"plan", "render", "servers", "provisioning", "certs", "wheelhouse", "ops", "scaffold", "database", "hooks",
     "processes"},
    {"settings", "project", "build", "buildenv", "appenv", "memo", "vcs"},
    {"model", "catalog", "layout", "secret", "errors", "onhost"},
]
APART = {"agent", "helper", "hostlib"}  # run on servers: nothing of fabdeploy but hostlib


def imports() -> dict[str, set[str]]:
    """Each module of the package, and the package's modules it imports (at any depth of the file)."""
    found = {}
    for path in PACKAGE.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names |= {node.module} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fabdeploy"):
                names |= {node.module.split(".")[1]} if "." in node.module else {a.name for a in node.names}
        found[path.stem] = {n.split(".")[0] for n in names}
    return found


def room(module: str) -> int:
    return next(i for i, members in enumerate(ROOMS) if module in members)


def test_every_module_has_a_room():
    placed = set().union(*ROOMS) | APART
    assert set(imports()) == placed, set(imports()) ^ placed


def test_no_module_imports_a_room_above_its_own():
    wrong = [(module, target) for module, targets in imports().items() if module not in APART
             for target in targets if target in set().union(*ROOMS) and room(target) < room(module)]
    assert wrong == []


def test_what_runs_on_servers_imports_only_hostlib():
    for module in APART:
        assert imports()[module] <= {"hostlib"}, module


def test_there_is_no_import_circle():
    graph = imports()
    cycles = []

    def walk(module, path):
        for target in graph.get(module, ()):
            if target in path:
                cycles.append(path[path.index(target):] + [target])
            elif target in graph:
                walk(target, path + [target])
    for start in graph:
        walk(start, [start])
    assert cycles == []
