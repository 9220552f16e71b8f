"""A wheel built from this checkout and installed in a fresh venv outside it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Installed:
    """A venv outside the checkout with the built wheel installed."""

    venv: Path
    home: Path
    sdist: Path
    wheel: Path
    build_log: str

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def run(
        self, *args: str, timeout: float = 300, **kw: object
    ) -> subprocess.CompletedProcess[str]:
        """``vballoon args`` from a directory that is not the checkout."""
        return subprocess.run(
            [self.bin("vballoon"), *args],
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=clean_env(),
        )


def clean_env() -> dict[str, str]:
    """No PYTHONPATH: nothing may come from the checkout."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def build_and_install() -> Iterator[Installed]:
    """Build the sdist and wheel, install the wheel in a new venv; removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="vballoon-wheel-"))
    try:
        dist = base / "dist"
        build = subprocess.run(
            [sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)],
            capture_output=True,
            text=True,
            timeout=900,
            env=clean_env(),
        )
        log = build.stdout + build.stderr
        assert build.returncode == 0, log[-3000:]
        sdist = next(dist.glob("vballoon-*.tar.gz"))
        wheel = next(dist.glob("vballoon-*.whl"))
        venv = base / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        pip = subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "-qq", str(wheel)],
            capture_output=True,
            text=True,
            timeout=900,
            env=clean_env(),
        )
        assert pip.returncode == 0, pip.stderr[-3000:]
        home = base / "elsewhere"
        home.mkdir()
        yield Installed(venv, home, sdist, wheel, log)
    finally:
        shutil.rmtree(base, ignore_errors=True)
