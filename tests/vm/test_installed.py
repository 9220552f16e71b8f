"""The installed wheel, outside the checkout, boots a guest: ``vballoon demo`` end to end."""

from __future__ import annotations

import subprocess

import pytest

from tests.package_rig import Installed, clean_env
from vm_harness.provision import TestEnv

pytestmark = pytest.mark.vm


def test_installed_demo_boots_a_guest_and_passes(installed: Installed, env: TestEnv) -> None:
    res = subprocess.run(
        [installed.bin("vballoon"), "demo", "--size", "768M"],
        cwd=installed.home,
        capture_output=True,
        text=True,
        timeout=900,
        env={**clean_env(), "VBALLOON_TESTENV": str(env.cache)},
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "demo passed" in out and "FAILED" not in out
    assert f"QEMU {env.qemu_version} ({env.accel})" in out
