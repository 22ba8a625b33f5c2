"""Dependencies point one way (issue 16 §3): checked by importing a layer in a fresh process
and listing what came with it."""

import ast
import json
import subprocess
import sys
from pathlib import Path

IO_MODULES = ("jmerge.io", "jmerge.io.gguf", "jmerge.io.safetensors_io", "jmerge.io.sharded", "jmerge.io.hf_dir",
              "jmerge.io.orbax_io")


def _imported_with(modules) -> set[str]:
    """The ``jmerge`` modules a fresh interpreter holds after importing ``modules``."""
    code = (f"import importlib, json, sys\nfor m in {list(modules)!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('jmerge'))))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=300)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_io_does_not_import_the_layers_above_it():
    loaded = _imported_with(IO_MODULES)
    assert set(IO_MODULES) <= loaded  # the imports themselves worked
    above = ("jmerge.methods", "jmerge.config", "jmerge.streaming", "jmerge.cli")
    assert not {m for m in loaded if any(m == a or m.startswith(a + ".") for a in above)}, sorted(loaded)


def _imports(path: Path) -> set[str]:
    """Every module an ``import`` statement of ``path`` names, at any depth (functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_io_sources_import_nothing_above_io_even_inside_functions():
    above = ("jmerge.methods", "jmerge.config", "jmerge.streaming", "jmerge.cli")
    io_dir = Path(__file__).parents[1] / "jmerge" / "io"
    bad = {f"{p.name}: {m}" for p in io_dir.glob("*.py") for m in _imports(p)
           if any(m == a or m.startswith(a + ".") for a in above)}
    assert not bad, sorted(bad)


def test_the_package_still_offers_the_method_api():
    """``jmerge.merge`` & co. load the registry on first use."""
    import jmerge
    from jmerge import available, get, merge  # noqa: F401

    assert jmerge.merge is jmerge.methods.merge and "ties" in jmerge.available()
