"""The package's structure, checked from its source: no import cycles, op files that use only `kernels/common` and
other ops' public names, one module that reads the environment, and a tuner seam that nothing outside the LoRA
tuner bypasses. Every import statement counts, including imports inside functions (a deferred import that only
hides a cycle is still a cycle)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package it is installed as.
PACKAGES = {ROOT / "peft_fast": "peft_fast", ROOT / "kernels": "peft_fast.kernels"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import statement of module `name`."""
    tree = ast.parse(MODULES[name].read_text())
    here = name if _is_package(name) else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out.append((base, [alias.name for alias in node.names], node.lineno))
    return out


def _edges(name: str) -> set[str]:
    """Package modules that `name` imports: `from pkg import mod` counts as importing pkg.mod, not pkg."""
    edges = set()
    for target, names, _ in _imports(name):
        submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
        if submodules:
            edges.update(submodules)
            if len(submodules) < len(names) and target in MODULES:
                edges.add(target)
        elif target in MODULES:
            edges.add(target)
    edges.discard(name)
    return edges


def _cycles() -> list[list[str]]:
    graph = {m: _edges(m) for m in MODULES}
    cycles, state, stack = [], {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return cycles


def test_the_walker_sees_the_package():
    assert "peft_fast.kernels.common.settings" in MODULES and "peft_fast.tuners.lora.layer" in MODULES
    assert "peft_fast.kernels.common.tiling" in _edges("peft_fast.kernels.lora_shrink")
    assert "peft_fast.tuners.registry" in _edges("peft_fast.config")  # `from .tuners import registry`


def test_a_cycle_would_be_found(monkeypatch):
    real = _edges
    monkeypatch.setitem(globals(), "_edges", lambda m: real(m) | ({"peft_fast.config"}
                                                                 if m == "peft_fast.tuners.registry" else set()))
    assert any("peft_fast.tuners.registry" in c and "peft_fast.config" in c for c in _cycles())


def test_no_import_cycles():
    assert _cycles() == []


OPS = sorted(m for m, p in MODULES.items() if p.parent == ROOT / "kernels" and p.name != "__init__.py")


@pytest.mark.parametrize("op", OPS)
def test_ops_import_only_common_and_public_names_of_other_ops(op):
    for target, names, line in _imports(op):
        if target.startswith("peft_fast.kernels.common") or not target.startswith("peft_fast"):
            continue
        assert target in OPS, f"{op}:{line} imports {target}: ops import kernels/common and other ops only"
        private = [n for n in names if n.startswith("_")]
        assert not private, f"{op}:{line} imports private names {private} of the op {target}"


def _reads_environment(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") and \
                isinstance(node.value, ast.Name) and node.value.id == "os":
            return True
    return False


def test_the_environment_is_read_in_one_module():
    readers = sorted(m for m, p in MODULES.items() if _reads_environment(p))
    assert readers == ["peft_fast.kernels.common.settings"]


def _grid_launches(path: Path) -> list[int]:
    """Lines that launch a Triton kernel as `something[grid](...)`: a call of a subscript."""
    return [node.lineno for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)]


def test_kernels_launch_through_the_cache():
    """Every kernel launch goes through common/launch.launch (cached compiled kernels); `fn[grid](...)` would take
    Triton's dispatcher on every call. launch.py itself falls back to it."""
    offenders = {m: lines for m, p in MODULES.items() if m.startswith("peft_fast.kernels")
                 and m != "peft_fast.kernels.common.launch" and (lines := _grid_launches(p))}
    assert offenders == {}


def test_a_grid_launch_would_be_found(tmp_path):
    src = tmp_path / "k.py"
    src.write_text("def f(k, x):\n    k[(1,)](x)\n    launch(k, (1,), x)\n")
    assert _grid_launches(src) == [2]


LORA_NAMES = {"LoraLinear", "LoraConfig", "LoraModel"}


def _names_lora(path: Path) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and node.value == "LORA":
            lines.append(node.lineno)
        elif isinstance(node, ast.Name) and node.id in LORA_NAMES:
            lines.append(node.lineno)
        elif isinstance(node, ast.Attribute) and node.attr in LORA_NAMES:
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and any(a.name in LORA_NAMES for a in node.names):
            lines.append(node.lineno)
    return lines


def test_only_the_lora_tuner_names_lora():
    """Everything else reaches LoRA through the tuner registry; the package root re-exports it for users."""
    offenders = {}
    for m, path in MODULES.items():
        if m.startswith("peft_fast.tuners.lora") or m == "peft_fast" or m.startswith("peft_fast.kernels"):
            continue
        lines = _names_lora(path)
        if lines:
            offenders[m] = lines
    assert offenders == {}


def test_every_package_is_in_the_wheel():
    """pyproject lists the packages by hand (peft_fast.kernels lives in kernels/): a new folder must be added there,
    or an installed wheel would lack it while the editable install used by the tests finds it."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.relative_to(ROOT).parent.parts) for p in (ROOT / "peft_fast").rglob("__init__.py")}
    found |= {"peft_fast." + ".".join(p.relative_to(ROOT).parent.parts)
              for p in (ROOT / "kernels").rglob("__init__.py")}
    assert found - listed == set(), f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"
    assert listed - found == set(), f"listed in pyproject.toml but not in the tree: {sorted(listed - found)}"


def test_the_lowest_run_pins_the_lower_bounds():
    """`make test-lowest` installs .ci/lowest.txt: each library there must be pinned at the lower bound pyproject.toml
    claims, and every claimed bound of torch, transformers and safetensors must be there, or the bound is untested."""
    import re
    import tomllib

    bounds = {}
    for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        m = re.match(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)", dep)
        if m and m[1] in ("torch", "transformers", "safetensors"):
            bounds[m[1]] = m[2]
    pins = dict(re.match(r"([A-Za-z0-9_.-]+)==([0-9.]+)", line).groups()
                for line in (ROOT / ".ci" / "lowest.txt").read_text().splitlines() if "==" in line)
    assert bounds.keys() == {"torch", "transformers", "safetensors"}, bounds
    for name, bound in bounds.items():
        want = tuple(int(v) for v in bound.split("."))
        assert tuple(int(v) for v in pins.get(name, "0").split("."))[:len(want)] == want, (name, bound, pins)
