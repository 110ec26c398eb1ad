"""The package as users install it: one import name, every module shipped, a light public face.

The wheel is built from exactly what deploy/Dockerfile's builder stage copies, so the same check
proves that the image's build context is complete.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import tiergate

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("gateway", "workers", "policies")
DATA_FILES = ("gateway/samples/*.jsonl", "policies/examples/*.yaml")


def _builder_copies() -> list[str]:
    """The repository paths deploy/Dockerfile's builder stage copies into the image."""
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    builder = text.split(" AS builder", 1)[1].split("\nFROM ", 1)[0]
    sources: list[str] = []
    for line in re.findall(r"^COPY (?!--)(.+)$", builder, flags=re.MULTILINE):
        sources += line.split()[:-1]  # the last word is the destination
    return sources


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """The wheel pip builds from the image's build context."""
    context = tmp_path_factory.mktemp("context")
    for source in _builder_copies():
        path = ROOT / source
        if path.is_dir():
            shutil.copytree(path, context / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, context / source)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(out),
            str(context),
        ],
        check=True,
        capture_output=True,
    )
    [built] = out.glob("tiergate-*.whl")
    return zipfile.ZipFile(built)


def test_the_wheels_only_top_level_package_is_tiergate(wheel):
    """The wheel holds the package tiergate and its metadata, nothing else at its top."""
    tops = {name.split("/", 1)[0] for name in wheel.namelist()}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"tiergate"}
    [top_level] = [n for n in wheel.namelist() if n.endswith(".dist-info/top_level.txt")]
    assert wheel.read(top_level).decode().split() == ["tiergate"]


def test_the_wheel_ships_every_module_and_data_file(wheel):
    """Each module and data file of gateway/, workers/ and policies/ is in the wheel."""
    expected = {"tiergate/__init__.py", "tiergate/__main__.py", "tiergate/py.typed"}
    for folder in SUBPACKAGES:
        expected |= {
            f"tiergate/{path.relative_to(ROOT).as_posix()}"
            for path in (ROOT / folder).rglob("*.py")
            if "__pycache__" not in path.parts
        }
    for pattern in DATA_FILES:
        expected |= {f"tiergate/{path.relative_to(ROOT).as_posix()}" for path in ROOT.glob(pattern)}
    assert expected <= set(wheel.namelist())
    shipped_tests = [name for name in wheel.namelist() if "/tests/" in name or "/bench/" in name]
    assert shipped_tests == []


def test_the_console_script_runs_the_packaged_cli(wheel):
    """The ``tiergate`` command points into the package."""
    [entry_points] = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    assert "tiergate = tiergate.gateway.cli:app" in wheel.read(entry_points).decode()


def test_every_public_name_resolves_to_its_defining_module():
    """``from tiergate import X`` works for each name in ``__all__``, and only for those."""
    for name in tiergate.__all__:
        value = getattr(tiergate, name)
        if name != "__version__":
            module = importlib.import_module(value.__module__)
            assert getattr(module, name) is value
    assert set(tiergate.__all__) == {*tiergate._EXPORTS, "__version__"}
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        tiergate.nothing_here  # noqa: B018


def test_importing_the_package_loads_no_heavy_dependency():
    """``import tiergate`` alone loads neither ONNX Runtime, an LLM SDK, Celery nor FastAPI."""
    heavy = ("onnxruntime", "openai", "anthropic", "celery", "fastapi", "torch", "matplotlib")
    probe = f"import sys, tiergate; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    loaded = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True
    ).stdout
    assert loaded.strip() == "[]"


def test_the_version_is_the_distributions():
    """``tiergate.__version__`` is the installed distribution's version."""
    from importlib.metadata import version

    assert tiergate.__version__ == version("tiergate")
