"""What a regular (non-editable) install gets: a wheel built from the tracked files holds every
module of the three packages, and each imports from the wheel alone (the tests otherwise run on an
editable install, which reads the source tree and so cannot see a package left out of the wheel)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from daemon.testing import REPO

PACKAGES = ("daemon", "deployers", "modeld_zenml")


@pytest.mark.slow
def test_a_wheel_holds_every_module_and_each_imports_from_it(tmp_path: Path):
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    src = tmp_path / "src"
    for name in tracked:  # a copy of what is committed: no build/ left over, nothing untracked
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "w")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "w").glob("modeld-*.whl")
    in_wheel = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")}
    in_source = {n for n in tracked if n.endswith(".py") and n.split("/")[0] in PACKAGES}
    assert in_source - in_wheel == set(), "modules a regular install would not have"
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)

    def importable(name: str) -> bool:  # without the extras (zenml, ray), and not an entry point that runs
        if name.endswith("/__main__.py") or name.startswith("modeld_zenml/"):
            return False
        return not name.startswith("deployers/ray/") or name == "deployers/ray/flavor.py"

    modules = sorted(n.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for n in in_source if importable(n))
    # Each module from the unpacked wheel (first on the path), run from a folder without the source;
    # then the CLI's --help, as the `modeld` script runs it.
    code = (
        f"import importlib, sys; sys.path.insert(0, {str(unpacked)!r})\n"
        f"for name in {modules!r}:\n"
        "    m = importlib.import_module(name)\n"
        f"    assert m.__file__.startswith({str(unpacked)!r}), (name, m.__file__)\n"
        "from deployers.cli import main\n"
        "sys.argv = ['modeld', '--help']\n"
        "main()\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "usage: modeld" in run.stdout, run.stderr[-3000:]
