"""The package's layers import downward only (docs/architecture.md):

    core  <-  qemu | host | guest  <-  net  <-  harness  <-  pytest layer

A module may import modules of its own layer and of lower ones, never of a higher one or of a
sibling at its level (qemu, host and guest do not know each other). Only the pytest layer imports
pytest. Plain Python: the imports of each module are read from its syntax tree (type-only imports
count too: a layer should not even name what sits above it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pytest_cpr"

CORE = {"errors", "kinds", "waits", "procfs", "units", "leftovers"}
PYTEST_LAYER = {"plugin", "fixtures", "vfio_fixtures", "vfio_hooks", "report"}
RANK = {"core": 0, "qemu": 1, "host": 1, "guest": 1, "net": 2, "harness": 3, "pytest": 4}
# modules kept at an old path for their users, re-exporting a module of a higher layer
COMPAT_SHIMS = {"guest.traffic": {"net.traffic"}}


def layer(module: str) -> str:
    """The layer of a module named relative to the package ('host.vfio', 'vm')."""
    top = module.split(".")[0]
    if top in ("qemu", "host", "guest", "net"):
        return top
    if top in CORE:
        return "core"
    if top in PYTEST_LAYER:
        return "pytest"
    return "harness"


def modules() -> list[str]:
    return sorted(".".join(p.relative_to(PACKAGE).with_suffix("").parts) for p in PACKAGE.rglob("*.py")
                  if p.name != "__init__.py")


def imports(module: str) -> set[str]:
    """Every module the module imports: pytest_cpr ones relative to the package, others by top name."""
    tree = ast.parse((PACKAGE / (module.replace(".", "/") + ".py")).read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "pytest_cpr":  # from pytest_cpr import checks, leftovers
                names.update(f"pytest_cpr.{alias.name}" for alias in node.names)
    return {n.removeprefix("pytest_cpr.") if n.startswith("pytest_cpr.") else n.split(".")[0]
            for n in names if n != "pytest_cpr"}


def allowed(importer: str, imported: str) -> bool:
    own, other = layer(importer), layer(imported)
    return own == other or RANK[other] < RANK[own] or imported in COMPAT_SHIMS.get(importer, set())


def internal(name: str) -> bool:
    return (PACKAGE / (name.replace(".", "/") + ".py")).exists() or (PACKAGE / name.replace(".", "/")).is_dir()


@pytest.mark.parametrize("module", modules())
def test_imports_run_downward(module: str) -> None:
    wrong = sorted(n for n in imports(module) if internal(n) and not allowed(module, n))
    assert not wrong, (f"pytest_cpr.{module} ({layer(module)} layer) imports {wrong} "
                       f"({', '.join(layer(n) for n in wrong)} layer): layers import downward only")


@pytest.mark.parametrize("module", modules())
def test_only_the_pytest_layer_imports_pytest(module: str) -> None:
    if layer(module) != "pytest":
        assert not {"pytest", "_pytest"} & imports(module), f"pytest_cpr.{module} imports pytest"


def test_the_contract_names_real_modules() -> None:
    """A renamed module must not slip out of its layer unnoticed."""
    present = set(modules())
    assert present >= CORE | PYTEST_LAYER, sorted((CORE | PYTEST_LAYER) - present)
    assert {"host.vfio", "host.hostconfig", "host.netns", "host.mdev", "guest.state", "net.traffic",
            "qemu.process"} <= present


def test_the_host_layer_knows_nothing_above_it() -> None:
    """The rule the layers exist for, spelt out: host/ imports no guest/, harness or pytest module."""
    for module in (m for m in modules() if layer(m) == "host"):
        above = {n for n in imports(module) if internal(n) and layer(n) not in ("core", "host")}
        assert not above, f"pytest_cpr.{module} imports {sorted(above)}"


def test_every_cleaner_in_the_registry_loads() -> None:
    from pytest_cpr import leftovers

    for kind in leftovers.CLEANERS:
        assert callable(leftovers.cleaner_for(kind)), kind
