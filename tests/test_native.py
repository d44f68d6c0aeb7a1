"""The compiled build (scripts/build-native.sh): what it compiles, and that a run against it
really imports the compiled modules.

`make test` runs the fast tests a second time with PYTHONPATH at `build/native` and
SIDECAR_EXPECT_NATIVE=1; then every module the script names must come from an extension
module, and the copy must have been built from the tree's current sources.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "build-native.sh"
EXPECT_NATIVE = os.environ.get("SIDECAR_EXPECT_NATIVE") == "1"


def compiled_paths() -> list[str]:
    text = SCRIPT.read_text()
    block = re.search(r"^modules=\(\n(.*?)^\)", text, re.S | re.M)
    assert block, "scripts/build-native.sh lists its modules in modules=( ... )"
    return block.group(1).split()


def module_name(path: str) -> str:
    name = path.removesuffix(".py").replace("/", ".")
    return name.removesuffix(".__init__")


def test_the_script_names_existing_modules() -> None:
    paths = compiled_paths()
    assert paths, "no module to compile"
    for path in paths:
        assert (ROOT / path).is_file(), path
        assert path.startswith("sidecar/") and path.endswith(".py"), path


@pytest.mark.skipif(not EXPECT_NATIVE, reason="runs against the compiled copy (make unit-native)")
def test_the_compiled_modules_are_the_ones_imported() -> None:
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    for path in compiled_paths():
        module = importlib.import_module(module_name(path))
        assert str(module.__file__).endswith(suffixes), (path, module.__file__)


@pytest.mark.skipif(not EXPECT_NATIVE, reason="runs against the compiled copy (make unit-native)")
def test_the_compiled_copy_is_built_from_these_sources() -> None:
    import sidecar

    copy = Path(sidecar.__file__).resolve().parent.parent
    assert copy != ROOT, "sidecar was imported from the source tree, not the compiled copy"
    # bench/native.py by its path: the tree itself stays off sys.path here.
    spec = importlib.util.spec_from_file_location("bench_native", ROOT / "bench" / "native.py")
    assert spec is not None and spec.loader is not None
    native = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(native)
    current = native.source_hash(ROOT)
    assert current
    assert (copy / "SOURCES").read_text().strip() == current


@pytest.mark.skipif(not EXPECT_NATIVE, reason="runs against the compiled copy (make unit-native)")
def test_a_subprocess_from_the_tree_imports_the_copy_too() -> None:
    # What the tests' `python -m sidecar` processes see: started in the source tree, they
    # must still import the compiled copy (PYTHONSAFEPATH=1 keeps the tree off the path).
    result = subprocess.run(
        [sys.executable, "-c", "import sidecar.proxy; print(sidecar.proxy.__file__)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.strip().endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
