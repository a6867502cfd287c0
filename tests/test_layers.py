"""The architecture as rules a reader can rely on: folder = layer, arrows point down, files stay readable."""
import ast
import os

import pytest

from tests.helpers import ROOT

LOW_LAYERS = ("models", "losses", "optim", "data")
RUN_MODULES = ("trainer", "checkpoint", "slurm", "preemption", "pretrain")
THIRD_PARTY_PRIVATE = ("torch", "dist", "np", "self", "F")  # private APIs of other libraries, and a class's own


def _py_files(*parts):
    top = os.path.join(ROOT, *parts)
    for dirpath, _, files in os.walk(top):
        for f in sorted(files):
            if f.endswith(".py"):
                yield os.path.join(dirpath, f)


def _imported_modules(path):
    """Absolute names of the fastclr modules ``path`` imports (relative imports resolved)."""
    rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
    package = rel[:-1]
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            yield mod
            yield from (f"{mod}.{a.name}" for a in node.names)


@pytest.mark.parametrize("layer", LOW_LAYERS)
def test_library_layers_do_not_import_the_run_machinery(layer):
    for path in _py_files("fastclr", layer):
        for mod in _imported_modules(path):
            parts = mod.split(".")
            assert not (parts[0] == "fastclr" and len(parts) > 1 and parts[1] in RUN_MODULES), (path, mod)


def test_kernels_never_import_fastclr():
    for path in _py_files("kernels"):
        for mod in _imported_modules(path):
            assert not mod.startswith("fastclr"), (path, mod)


def test_benchmarks_use_public_names_only():
    for path in _py_files("benchmarks"):
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("fastclr", "kernels")):
                for alias in node.names:
                    assert not alias.name.startswith("_"), (path, node.module, alias.name)
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                root = node.value
                while isinstance(root, ast.Attribute):
                    root = root.value
                name = root.id if isinstance(root, ast.Name) else ""
                assert name in THIRD_PARTY_PRIVATE, f"{path}:{node.lineno}: private name {node.attr} of {name}"


def test_files_stay_readable():
    sizes = {os.path.relpath(p, ROOT): sum(1 for _ in open(p)) for p in _py_files("fastclr")}
    assert sizes[os.path.join("fastclr", "trainer.py")] <= 250
    assert max(sizes.values()) <= 400, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


def test_choice_lists_have_one_source():
    """Every choice the config offers is implemented, and the library's lists are the config's."""
    from fastclr.config import Arch, LossImpl, LrScaling, choices
    from fastclr.losses import IMPLS
    from fastclr.models import ARCHS
    from fastclr.models.resnet import _SPECS
    from fastclr.optim.schedule import RULES

    assert ARCHS == choices(Arch) and set(_SPECS) == set(ARCHS)
    assert IMPLS == choices(LossImpl)
    assert set(RULES) | {"none"} == set(choices(LrScaling))
