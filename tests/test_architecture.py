"""The code's shape, checked: options defined once (CLI and recipe generated from each stage's config), no
import cycles, layers that import one way, no private name used across files."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import typer
from typer.core import TyperOption

ROOT = Path(__file__).resolve().parents[1] / "curate"


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) of every import in the file, function bodies included."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names if alias.name.split(".")[0] == "curate"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            if base.split(".")[0] != "curate":
                continue
            names = [a.name for a in node.names]
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
            found.append((base, [n for n in names if f"{base}.{n}" not in known], node.lineno))
            found += [(m, [], node.lineno) for m in submodules]
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    graph = {}
    for name, path in mods.items():
        targets = set()
        for target, _, _ in imports_of(name, path, known):
            while target not in known and "." in target:
                target = target.rpartition(".")[0]
            if target in known and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def package_of(module: str) -> str:
    """The layer a module belongs to: curate.io.tables -> io, curate.stages.score.entry -> stages."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "curate"


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan): each is an import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


# Still to be split into one-way packages (this list may only shrink, and ends empty).
KNOWN_CYCLES: list[set[str]] = []


def test_no_import_cycle_among_modules():
    found = cycles(import_graph())
    assert sorted(map(sorted, found)) == sorted(map(sorted, KNOWN_CYCLES)), found


# which layers a layer may import (curate/__init__, errors and config are the base every layer may use)
ALLOWED = {
    "io": {"io"},
    "metrics": {"metrics"},
    "models": {"models", "io", "run"},
    "run": {"run", "io"},
    "stages": {"stages", "io", "metrics", "models", "run", "ui"},
    "ui": {"ui", "stages"},
    "recipe": {"recipe", "stages", "io", "run", "models"},
    # compare runs a recipe (the curation chain, through the planner), then trains students: above recipe; it
    # measures the signals against the ground truth with the metrics' pure math
    "compare": {"compare", "recipe", "stages", "io", "run", "models", "metrics"},
    "cli": {"cli", "stages", "io", "run", "models", "recipe", "compare", "ui"},
}
BASE = {"curate", "errors", "config", "__init__"}
# Still to be moved while the stages become packages (this list may only shrink, and ends empty).
KNOWN_LAYER_PROBLEMS: set[str] = set()
KNOWN_PRIVATE_USES: set[str] = set()


def test_layers_import_one_way():
    problems = []
    for module, targets in import_graph().items():
        layer = package_of(module)
        for target in targets:
            other = package_of(target)
            if other in BASE or layer in BASE:
                continue
            if other not in ALLOWED.get(layer, {layer}):
                problems.append(f"{module} imports {target}")
    assert set(problems) == KNOWN_LAYER_PROBLEMS, "\n".join(sorted(set(problems) ^ KNOWN_LAYER_PROBLEMS))


def test_no_private_name_is_used_across_files():
    mods = modules()
    known = set(mods)
    problems = []
    for name, path in mods.items():
        for target, names, line in imports_of(name, path, known):
            problems += [f"{path.relative_to(ROOT.parent)}:{line} imports {target}.{n}"
                         for n in names if n.startswith("_") and not n.startswith("__")]
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):  # `from curate.stages import export as one` ... `one._write_run`
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("curate"):
                aliases.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names
                                if f"{node.module}.{a.name}" in known})
            elif isinstance(node, ast.Import):
                aliases.update({a.asname: a.name for a in node.names if a.asname and a.name.startswith("curate")})
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                problems.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert set(problems) == KNOWN_PRIVATE_USES, "\n".join(sorted(set(problems) ^ KNOWN_PRIVATE_USES))


# ---------------------------------------------------------------- options defined once

def stage_commands():
    from curate.cli import app
    from curate.config import COMMANDS

    group = typer.main.get_command(app)
    out = []
    for name, spec in COMMANDS.items():
        command = group
        for part in name.split():
            command = command.commands[part]
        out.append((name, spec, command))
    return out


def test_every_cli_option_of_a_stage_is_its_config_or_a_run_option_or_an_input():
    from curate.config import RunOptions, options_of

    commands = stage_commands()
    assert len(commands) >= 2
    for name, spec, command in commands:
        options = {p.name for p in command.params if isinstance(p, TyperOption)}
        config = {o.name for o in options_of(spec.config) if o.info.cli} if spec.config else set()
        run = set(spec.run_options)
        assert run <= {o.name for o in options_of(RunOptions)}
        assert options == config | run | (set(spec.inputs) & options), name
        assert not config & set(spec.inputs), name  # an input is never also an option


def test_every_recipe_key_is_a_config_option_or_a_section_input():
    from curate.config import recipe_keys
    from curate.recipe import SCHEMA, SECTION_CONFIGS, section_keys

    for section, (config, config_section) in SECTION_CONFIGS.items():
        options = set(recipe_keys(config, config_section))
        keys = set(section_keys(section))
        assert keys == options | set(SCHEMA[section]), section
        assert not options & set(SCHEMA[section]), section  # no option written by hand a second time


def test_cli_and_recipe_defaults_are_the_configs():
    from curate.config import options_of, recipe_keys
    from curate.recipe import SECTION_CONFIGS

    for name, spec, command in stage_commands():
        if spec.config is None:
            continue
        defaults = {p.name: p.default for p in command.params if isinstance(p, TyperOption)}
        for opt in options_of(spec.config):
            if opt.info.cli:
                default = defaults[opt.name]
                if isinstance(opt.default, list) and opt.default and not isinstance(opt.default[0], str):
                    default = [type(opt.default[0])(v) for v in default]  # numbers given as strings (commas)
                assert default == opt.default, (name, opt.name)
    for section, (config, config_section) in SECTION_CONFIGS.items():
        assert all(o.default == getattr(config(), name) for name, o in recipe_keys(config, config_section).items())


# ---------------------------------------------------------------- light imports

HEAVY = ("torch", "numpy", "pyarrow")


def heavy_modules_after(statement: str) -> list[str]:
    """The heavy libraries (HEAVY) a fresh Python process has imported after running `statement`."""
    code = f"import sys\n{statement}\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": str(ROOT.parent)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT.parent)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_stage_packages_hold_their_options_in_light_modules():
    """A stage package's __init__ (its config, result and constants, what the command line imports) imports no
    torch, numpy or pyarrow; the code that needs them is in the package's other modules."""
    packages = sorted(".".join(p.parent.relative_to(ROOT.parent).parts) for p in ROOT.glob("stages/*/__init__.py"))
    packages += [".".join(p.parent.relative_to(ROOT.parent).parts) for p in ROOT.glob("*/__init__.py")
                 if (p.parent / "entry.py").is_file()]  # packages above the stages (compare)
    assert "curate.stages.synth" in packages and "curate.compare" in packages
    for package in packages:
        assert heavy_modules_after(f"import {package}") == [], package


def test_the_command_line_does_not_import_torch():
    """`curate --help` (importing curate.cli) stays fast: torch is imported by a command when it runs."""
    assert "torch" not in heavy_modules_after("import curate.cli")
