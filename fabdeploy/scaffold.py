"""What `fabdeploy init` writes: a project's files in, fabfile.py and fabric.yaml out.

Nothing here reads the disk or imports the project. The metadata
(pyproject.toml, setup.cfg, setup.py) and the sources arrive as text and are
parsed: setup.py with ast, never run. fabdeploy/__main__.py reads and writes.
"""
from __future__ import annotations

import ast
import configparser
import fnmatch
import json
import posixpath
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import DeployError

if sys.version_info >= (3, 11):
    import tomllib
else:  # a dependency on 3.10
    import tomli as tomllib

Files = Mapping[str, str]  # a project: posix path relative to its root -> text
METADATA = ("pyproject.toml", "setup.cfg", "setup.py")
WRITES = ("fabfile.py", "fabric.yaml")
# Files fab would read instead of ours: a package beats a module, fabric.yaml beats the rest.
SHADOWS = {"fabfile/__init__.py": "fabfile.py", "fabric.yml": "fabric.yaml",
           "fabric.json": "fabric.yaml", "fabric.py": "fabric.yaml"}
FACTORIES = ("create_app", "make_app")  # what `flask --app pkg` looks for too
OBJECTS = ("app", "application")
FIRST_MODULES = ("__init__", "wsgi", "app", "application", "main", "server")
# setuptools' reserved top-level names (setuptools/discovery.py), and alembic's migrations/.
NOT_PACKAGES = ("bin", "build", "ci", "debian", "dist", "doc", "docs", "env", "example",
                "examples", "scripts", "test", "tests", "tools", "util", "utils", "venv",
                "benchmark", "benchmarks", "migrations", "tasks", "fabfile")
NOT_MODULES = ("setup", "conftest", "test", "tests", "noxfile", "toxfile", "tasks",
               "fabfile", "manage", "example", "examples", "build", "benchmark")
FABFILE = "from fabdeploy import ns  # noqa: F401  (fab --list shows its tasks)\n"
PROXY_FIX = ("from werkzeug.middleware.proxy_fix import ProxyFix",
             "app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1, x_port=1)")


@dataclass(frozen=True)
class Module:
    """A module the wheel installs: its import name and its file in the project."""

    name: str   # "guestbook", "guestbook.wsgi", "wsgi"
    path: str   # "src/guestbook/__init__.py"

    @property
    def in_package(self) -> bool:
        return "." in self.name or self.path.endswith("/__init__.py")


@dataclass(frozen=True)
class Find:
    """A package search: setuptools' find_packages / find: / packages.find."""

    where: str = ""
    include: tuple = ("*",)
    exclude: tuple = ()
    namespaces: bool = False


@dataclass(frozen=True)
class App:
    """Where the app is and what it holds."""

    wsgi: str                 # gunicorn's and `flask --app`'s spec: "pkg:create_app()"
    module: Module
    what: str                 # "create_app()", "app = Flask(...)"
    instance: str | None      # Flask's import name, which names its instance folder
    proxy_fix: bool = False
    init_db: bool = False
    flask: bool = False


@dataclass(frozen=True)
class Scaffold:
    """What init decided: the settings, the files to write, and advice for the user."""

    app: str
    wsgi: str
    deploy_to: str
    source: str               # the metadata file the name came from
    found_in: str             # the file the app came from
    files: dict = field(default_factory=dict)
    advice: tuple = ()


# -- the whole decision ----------------------------------------------------

def scaffold(files: Files, where: str = ".") -> Scaffold:
    """Settings and files for the project in `files` (`where` names it in errors)."""
    if not any(name in files for name in METADATA):
        raise DeployError(f"no pyproject.toml, setup.cfg or setup.py in {where}",
                          hint="run fabdeploy init in your project, or name its directory")
    name, source = project_name(files)
    found = find_app(files, installed_modules(files, name), name)
    app = app_name(name, found)
    deploy_to = f"/srv/{app}"
    text = fabric_yaml(app, found, deploy_to, source)
    return Scaffold(app, found.wsgi, deploy_to, source, found.module.path,
                    {"fabfile.py": FABFILE, "fabric.yaml": text}, tuple(advice(app, found)))


def check_free(existing: set[str], force: bool) -> None:
    """Refuse, before writing anything, to overwrite a file (unless forced) or to be shadowed."""
    for path, ours in SHADOWS.items():
        if path in existing:
            shown = path.split("/")[0] + ("/" if "/" in path else "")
            raise DeployError(f"{shown} exists, and fab would read it rather than the {ours} "
                              "init writes", hint=f"merge by hand, or move {shown} away first")
    taken = [path for path in WRITES if path in existing]
    if taken and not force:
        verb = "exists" if len(taken) == 1 else "exist"
        raise DeployError(f"{' and '.join(taken)} {verb} already",
                          hint="pass --force to replace, or edit by hand")


def report(s: Scaffold, written: list[str]) -> str:
    """What init tells the user: what it found, what it wrote, what is left to do."""
    lines = [f"{s.app}: {s.wsgi} (found in {s.found_in}; the project is named in {s.source})",
             f"wrote {', '.join(written)}", *s.advice,
             "next: fill in hosts (or pass -H), proxy.server_name and tls in fabric.yaml, then",
             "  fab -H root@HOST provision    # once, on a fresh Debian or Ubuntu server",
             "  fab -H deploy@HOST deploy"]
    return "\n".join(lines)


# -- the project's name ------------------------------------------------------

def project_name(files: Files) -> tuple[str, str]:
    """The distribution's name and the file that gives it."""
    pyproject = toml(files)
    name = pyproject.get("project", {}).get("name") or \
        pyproject.get("tool", {}).get("poetry", {}).get("name")
    if isinstance(name, str) and name:
        return name, "pyproject.toml"
    cfg = setup_cfg(files)
    if cfg.get("metadata", "name", fallback=""):
        return cfg.get("metadata", "name").strip(), "setup.cfg"
    name = setup_py(files).get("name")
    if isinstance(name, str) and name:
        return name, "setup.py"
    given = [path for path in METADATA if path in files]
    raise DeployError(f"no project name in {' or '.join(given)}",
                      hint="set [project] name in pyproject.toml")


def toml(files: Files) -> dict:
    if "pyproject.toml" not in files:
        return {}
    try:
        return tomllib.loads(files["pyproject.toml"])
    except tomllib.TOMLDecodeError as exc:
        raise DeployError(f"pyproject.toml does not parse: {exc}", hint="fix it") from None


def setup_cfg(files: Files) -> configparser.ConfigParser:
    cfg = configparser.ConfigParser(interpolation=None)
    try:
        cfg.read_string(files.get("setup.cfg", ""))
    except configparser.Error as exc:
        raise DeployError(f"setup.cfg does not parse: {exc.message.splitlines()[0]}",
                          hint="fix it") from None
    return cfg


UNKNOWN = object()  # a setup() argument that is not a plain value


def setup_py(files: Files) -> dict:
    """setup()'s keyword arguments that are plain values (or find_packages calls), by ast."""
    if "setup.py" not in files:
        return {}
    try:
        tree = ast.parse(files["setup.py"], "setup.py")
    except SyntaxError as exc:
        raise DeployError(f"setup.py does not parse: line {exc.lineno}: {exc.msg}",
                          hint="fix it") from None
    names = {}  # NAME = "value" at the top: setup(name=NAME) is common
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name):
            names[node.targets[0].id] = value_of(node.value, {})
    call = next((node for node in ast.walk(tree) if isinstance(node, ast.Call)
                 and call_name(node) == "setup"), None)
    if call is None:
        return {}
    return {kw.arg: value_of(kw.value, names) for kw in call.keywords if kw.arg}


def value_of(node: ast.AST, names: dict) -> Any:
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, ast.Call) and call_name(node) in ("find_packages", "find_namespace_packages"):
        args = {"where": node.args[0] if node.args else None,
                **{kw.arg: kw.value for kw in node.keywords if kw.arg}}
        plain = {k: value_of(v, names) for k, v in args.items() if v is not None}
        if any(v is UNKNOWN for v in plain.values()):
            return UNKNOWN
        return Find(where=plain_dir(plain.get("where", "")),
                    include=tuple(plain.get("include", ("*",))),
                    exclude=tuple(plain.get("exclude", ())),
                    namespaces=call_name(node) == "find_namespace_packages")
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return UNKNOWN


def call_name(node: ast.Call) -> str | None:
    """`f(...)` and `x.f(...)` are both calls of f."""
    func = node.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) \
        else None


# -- what the wheel installs ---------------------------------------------------

def installed_modules(files: Files, name: str) -> list[Module]:
    """The modules the project's wheel installs, found as its build backend would."""
    pyproject = toml(files)
    backend = pyproject.get("build-system", {}).get("build-backend", "setuptools")
    tool = pyproject.get("tool", {})
    if backend.startswith("flit"):
        module = tool.get("flit", {}).get("module", {}).get("name")
        return by_name(files, module or name.replace("-", "_"))
    if backend.startswith("hatchling"):
        paths = tool.get("hatch", {}).get("build", {}).get("targets", {}).get("wheel", {}) \
            .get("packages")
        return [m for p in paths for m in package_at(files, p)] if paths else by_name(files, name)
    if backend.startswith("poetry"):
        given = tool.get("poetry", {}).get("packages")
        if given:
            return [m for p in given if isinstance(p, dict) and "include" in p
                    for m in package_at(files, posixpath.join(p.get("from", ""), p["include"]))]
        return by_name(files, name)
    if backend.startswith("setuptools"):
        return setuptools_modules(files)
    return by_name(files, name) or auto_discovered(files, {})


def by_name(files: Files, name: str) -> list[Module]:
    """The package or module named after the project, at the top or in src/ (flit, hatch)."""
    for import_name in dict.fromkeys([name, re.sub(r"[-.]+", "_", name),
                                      re.sub(r"[-.]+", "_", name).lower()]):
        for base in ("", "src/"):
            if f"{base}{import_name}/__init__.py" in files:
                return package_at(files, base + import_name)
            if f"{base}{import_name}.py" in files:
                return [Module(import_name, f"{base}{import_name}.py")]
    return []


def package_at(files: Files, path: str) -> list[Module]:
    """Every module of the package in directory `path`, and its subpackages."""
    path = path.strip("/")
    top = posixpath.basename(path)
    found = []
    for file in sorted(files):
        if not (file.startswith(path + "/") and file.endswith(".py")):
            continue
        parts = file[len(path) + 1:-3].split("/")
        dirs = [posixpath.join(path, *parts[:i]) for i in range(1, len(parts))]
        if all(f"{d}/__init__.py" in files for d in dirs):  # inside regular packages only
            found.append(Module(".".join([top, *parts]).removesuffix(".__init__"), file))
    return found


def setuptools_modules(files: Files) -> list[Module]:
    """setuptools: packages, py-modules and package-dir from pyproject.toml, setup.py or setup.cfg."""
    packages, modules, package_dir = setuptools_config(files)
    if packages is None and modules is None:
        return auto_discovered(files, package_dir)
    found: list[Module] = []
    if isinstance(packages, Find):
        if packages.where:  # setuptools takes a single `where` as package-dir's root too
            package_dir = {"": packages.where, **package_dir}
        packages = discover(files, packages, package_dir)
    for package in packages or ():
        found += direct_modules(files, package, package_path(package, package_dir))
    for module in modules or ():
        parent, _, leaf = module.rpartition(".")
        base = package_path(parent, package_dir) if parent else package_dir.get("", "")
        path = posixpath.join(base, f"{leaf}.py")
        if path in files:
            found.append(Module(module, path))
    return found


def setuptools_config(files: Files) -> tuple[Any, Any, dict]:
    """(packages, py_modules, package_dir), each from the first of pyproject.toml, setup.py
    and setup.cfg that gives it; None where none does."""
    tool = toml(files).get("tool", {}).get("setuptools", {})
    call = setup_py(files)
    cfg = setup_cfg(files)
    options = dict(cfg["options"]) if cfg.has_section("options") else {}
    packages = tool.get("packages", call.get("packages"))
    if isinstance(packages, dict):
        packages = pyproject_find(packages.get("find", {}))
    elif packages is None and "packages" in options:
        packages = cfg_packages(cfg, options["packages"])
    modules = tool.get("py-modules", call.get("py_modules"))
    if modules is None and "py_modules" in options:
        modules = cfg_list(options["py_modules"])
    package_dir = tool.get("package-dir", call.get("package_dir"))
    if package_dir is None and "package_dir" in options:
        pairs = [line.split("=", 1) for line in cfg_list(options["package_dir"]) if "=" in line]
        package_dir = {key.strip(): value.strip() for key, value in pairs}
    # A value that is not plain (computed in setup.py): setuptools' discovery speaks for it.
    packages, modules = (None if v is UNKNOWN else v for v in (packages, modules))
    return packages, modules, {} if package_dir in (None, UNKNOWN) else dict(package_dir)


def pyproject_find(find: dict) -> Find:
    """[tool.setuptools.packages.find]; namespaces are on by default there."""
    return Find(where=plain_dir((find.get("where") or [""])[0]),
                include=tuple(find.get("include", ["*"])), exclude=tuple(find.get("exclude", [])),
                namespaces=find.get("namespaces", True))


def cfg_packages(cfg: configparser.ConfigParser, value: str) -> Find | list[str]:
    if value.strip() in ("find:", "find_namespace:"):
        find = cfg["options.packages.find"] if cfg.has_section("options.packages.find") else {}
        return Find(where=plain_dir(find.get("where", "").strip()),
                    include=tuple(cfg_list(find.get("include", "*"))),
                    exclude=tuple(cfg_list(find.get("exclude", ""))),
                    namespaces=value.strip() == "find_namespace:")
    return cfg_list(value)


def plain_dir(path: object) -> str:
    """A project-relative directory as the file names have it: "" for the top."""
    if not isinstance(path, str) or path in ("", "."):
        return ""
    return posixpath.normpath(path).strip("/")


def cfg_list(value: str) -> list[str]:
    return [item.strip() for item in re.split(r"[,\n]", value) if item.strip()]


def package_path(package: str, package_dir: dict) -> str:
    """The directory of a dotted package, with setuptools' package_dir mapping."""
    parts = package.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in package_dir:
            return posixpath.join(package_dir[prefix], *parts[i:])
    return posixpath.join(package_dir.get("", ""), *parts)


def direct_modules(files: Files, package: str, base: str) -> list[Module]:
    """The modules directly in one package's directory (an explicit packages list names each)."""
    base = base.strip("/")
    found = []
    for file in sorted(files):
        rest = file[len(base) + 1:] if base else file
        if (not base or file.startswith(base + "/")) and rest.endswith(".py") and "/" not in rest:
            leaf = rest[:-3]
            found.append(Module(package if leaf == "__init__" else f"{package}.{leaf}", file))
    return found


def discover(files: Files, find: Find, package_dir: dict) -> list[str]:
    """The packages a find_packages-style search returns."""
    where = (find.where or package_dir.get("", "")).strip("/")
    dirs = {posixpath.dirname(f) for f in files if f.endswith(".py")}
    found = []
    for d in sorted(dirs):
        rel = d[len(where) + 1:] if where else d
        if (where and not d.startswith(where + "/")) or not rel:
            continue
        name = rel.replace("/", ".")
        if not all(part.isidentifier() for part in name.split(".")):
            continue
        regular = all(f"{posixpath.join(where, *rel.split('/')[:i])}/__init__.py" in files
                      for i in range(1, rel.count("/") + 2))
        if (regular or find.namespaces) \
                and any(fnmatch.fnmatchcase(name, p) for p in find.include) \
                and not any(fnmatch.fnmatchcase(name, p) for p in find.exclude):
            found.append(name)
    return found


def auto_discovered(files: Files, package_dir: dict) -> list[Module]:
    """setuptools' automatic discovery: a src/ layout, else the flat packages, else the modules."""
    if "" not in package_dir and any(f.startswith("src/") and f.endswith(".py") for f in files):
        package_dir = {"": "src"}
    base = package_dir.get("", "").strip("/")
    inside = {(f[len(base) + 1:] if base else f): f for f in files
              if f.endswith(".py") and (not base or f.startswith(base + "/"))}
    packages = sorted({rel.split("/")[0] for rel in inside if "/" in rel})
    packages = [p for p in packages if p.isidentifier() and p not in NOT_PACKAGES
                and not p.startswith("_")]
    if packages:
        return [m for p in packages for m in package_at(files, posixpath.join(base, p))]
    return [Module(rel[:-3], path) for rel, path in sorted(inside.items())
            if "/" not in rel and rel[:-3].isidentifier() and rel[:-3] not in NOT_MODULES
            and not rel.startswith("_")]


# -- the app -------------------------------------------------------------------

def find_app(files: Files, modules: list[Module], name: str) -> App:
    """The best app factory or app object among the installed modules.

    Shallow modules first, and in one module a factory before a Flask object
    before any other `app = ...`: `flask --app` and gunicorn take all three.
    """
    if not modules:
        raise DeployError(f"found no package or module that the wheel of {name} installs",
                          hint="check the packages or py-modules settings of your build")
    trees: dict[Module, ast.Module] = {}
    for module in modules:
        tree = None if is_test(module) else parse(files[module.path], module.path)
        if tree is not None:
            trees[module] = tree
    candidates, needy = [], []
    for module, tree in trees.items():
        found, needs_arguments = app_candidates(module, tree)
        needy += [(module, func) for func in needs_arguments]
        candidates += [((module.name.count("."), rank, module_rank(module), module.path),
                        module, what, wsgi, instance) for rank, what, wsgi, instance in found]
    if not candidates:
        where = ", ".join(sorted(m.path for m in trees)[:5]) + (", ..." if len(trees) > 5 else "")
        if needy:
            module, func = needy[0]
            example = f"{module.name}:{func}('production')"
            raise DeployError(f"{func}() in {module.path} needs arguments",
                              hint=f"set wsgi in fabric.yaml, e.g. wsgi: \"{example}\"")
        raise DeployError(f"found no create_app(), make_app() or app = Flask(...) in {where}",
                          hint="set wsgi in fabric.yaml, e.g. wsgi: package.module:app")
    _, module, what, wsgi, instance = min(candidates, key=lambda c: c[0])
    everything = list(trees.values())
    return App(wsgi, module, what, instance,
               proxy_fix=any(uses(tree, "ProxyFix") for tree in everything),
               init_db=any(defines_init_db(tree) for tree in everything),
               flask=instance is not None or any(imports_flask(tree) for tree in everything))


def parse(text: str, path: str) -> ast.Module | None:
    try:
        return ast.parse(text, path)
    except (SyntaxError, ValueError):
        return None  # not ours to fix here; the build will say so


def is_test(module: Module) -> bool:
    parts = module.name.split(".")
    return any(p in ("test", "tests", "conftest") or p.startswith("test_") for p in parts)


def module_rank(module: Module) -> int:
    """A package's __init__ first, then the files an app usually lives in."""
    leaf = posixpath.basename(module.path)[:-3]
    return FIRST_MODULES.index(leaf) if leaf in FIRST_MODULES else len(FIRST_MODULES)


def app_candidates(module: Module, tree: ast.Module) -> tuple[list[tuple], list[str]]:
    """(rank, what, wsgi, instance) of each factory and app object at the module's top level,
    and the factories that need arguments."""
    found, needy = [], []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in FACTORIES:
            if not callable_bare(node.args):
                needy.append(node.name)
                continue
            flask = next((c for c in ast.walk(node) if isinstance(c, ast.Call)
                          and call_name(c) == "Flask"), None)
            found.append((0, f"{node.name}()", f"{module.name}:{node.name}()",
                          flask_name(flask, module) if flask else None))
        target, value = assignment(node)
        if target in OBJECTS and isinstance(value, ast.Call):
            is_flask = call_name(value) == "Flask"
            found.append((1 if is_flask else 2, f"{target} = {call_name(value)}(...)",
                          f"{module.name}:{target}", flask_name(value, module) if is_flask else None))
    return found, needy


def assignment(node: ast.AST) -> tuple[str | None, ast.AST | None]:
    if isinstance(node, ast.Assign) and len(node.targets) == 1 \
            and isinstance(node.targets[0], ast.Name):
        return node.targets[0].id, node.value
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return node.target.id, node.value
    return None, None


def callable_bare(args: ast.arguments) -> bool:
    """Can the function be called with no arguments?"""
    positional = args.posonlyargs + args.args
    return len(args.defaults) == len(positional) and all(d is not None for d in args.kw_defaults)


def flask_name(call: ast.Call, module: Module) -> str | None:
    """Flask(import_name, ...)'s import name: it names the app's instance folder."""
    arg = call.args[0] if call.args else next(
        (kw.value for kw in call.keywords if kw.arg == "import_name"), None)
    if isinstance(arg, ast.Name) and arg.id == "__name__":
        return module.name
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    return None


def uses(tree: ast.Module, name: str) -> bool:
    """Is `name` called anywhere (ProxyFix(...) or middleware.ProxyFix(...))?"""
    return any(isinstance(n, ast.Call) and call_name(n) == name for n in ast.walk(tree))


def defines_init_db(tree: ast.Module) -> bool:
    """Does the module make an `init-db` click command (named so, or def init_db)?"""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and (call_name(node) or "").endswith("command"):
            values = node.args + [kw.value for kw in node.keywords if kw.arg == "name"]
            if any(isinstance(v, ast.Constant) and v.value == "init-db" for v in values):
                return True
        if isinstance(node, ast.FunctionDef) and node.name == "init_db":
            for d in node.decorator_list:
                func = d.func if isinstance(d, ast.Call) else d
                bare = not (isinstance(d, ast.Call) and (d.args or d.keywords))
                label = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
                if bare and label.endswith("command"):
                    return True
    return False


def imports_flask(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "flask" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "flask":
            return True
    return False


# -- the settings and the files ---------------------------------------------------

def app_name(distribution: str, found: App) -> str:
    """fabdeploy's `app`: the distribution's name, or the package's where they differ.

    fabdeploy links `venv/var/<app>-instance` (dashes as underscores) to the
    shared instance folder, and Flask names that folder after the package.
    """
    name = re.sub(r"[-_.]+", "-", distribution).lower()
    top = found.module.name.split(".")[0]
    if found.module.in_package and name.replace("-", "_") != top:
        return top
    return name


def advice(app: str, found: App) -> list[str]:
    lines = []
    if found.flask and not found.proxy_fix:
        lines += ["The app does not use ProxyFix, so behind the proxy it sees the proxy's address "
                  "and http:// on every request. With one proxy in front, add where the app is made:",
                  *(f"    {line}" for line in PROXY_FIX)]
    linked = app.replace("-", "_")
    if found.instance and found.instance != linked:
        lines += [f"Flask keeps this app's instance folder in venv/var/{found.instance}-instance, but "
                  f"fabdeploy links venv/var/{linked}-instance to shared/instance: the app would not "
                  "read the SECRET_KEY in shared/instance/config.py, and its instance files would "
                  f"not outlive a release. Make the app in the package {linked}, or pass "
                  "Flask(__name__, instance_path=...)."]
    return lines


def fabric_yaml(app: str, found: App, deploy_to: str, source: str) -> str:
    """The commented fabric.yaml: what init found as settings, the rest for the user to fill."""
    active = [("app", app, "names deploy_to, the site and the service"),
              ("wsgi", found.wsgi, f"{found.what} in {found.module.path}"),
              ("deploy_to", deploy_to, "")]
    if not found.init_db:
        active.append(("init_command", "", "the app has no init-db command to run on a first deploy"))
    host = f"{app}.example.com"
    lines = [(f"  {key}: {scalar(value)}", note) for key, value, note in active]
    lines += [("  # To fill in:", ""),
              (f"  # hosts: [deploy@{host}]", f"or: fab -H deploy@{host} deploy"),
              ("  # proxy:", ""),
              (f"  #   server_name: {host}", "the site's public names; _ answers any"),
              ("  # tls:", ""),
              ("  #   mode: acme", "a Let's Encrypt certificate for server_name"),
              ("  #   email: you@example.com", "")]
    width = max(len(text) for text, _ in lines) + 2
    return "\n".join([
        f"# fabdeploy's settings for {app}, written by `fabdeploy init` from {source}.",
        "# Every key is optional (README.md, \"Configuration reference\"); Fabric's own",
        "# settings (user, port, connect_kwargs) may sit beside `fabdeploy:`.",
        "fabdeploy:",
        *((text.ljust(width) + f"# {note}" if note else text) for text, note in lines),
        ""])


YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"}  # not strings


def scalar(value: str) -> str:
    """A YAML scalar: plain where that reads back the same, else JSON's quoting (valid YAML)."""
    if re.fullmatch(r"[A-Za-z_/~][\w.:/()~-]*", value) and not value.endswith(":") \
            and value.lower() not in YAML_WORDS:
        return value
    return json.dumps(value)
