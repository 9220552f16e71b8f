"""The distribution: ``python -m build`` makes an sdist and a wheel, and the wheel installed in
a fresh venv outside the checkout runs ``serve``, ``ctl``, both host benchmarks and ``demo``.

Building and installing need PyPI (cffi, setuptools, qemu.qmp), as ``make test`` does.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import tarfile
import zipfile

import pytest

from tests.package_rig import Installed, clean_env
from vballoon.waiting import wait_until

#: Python warning categories a build must not print about this project's configuration.
_BUILD_WARNING = re.compile(r"\b\w*(Warning|Deprecat\w*)\b: ")


def test_the_build_prints_no_warnings(installed: Installed) -> None:
    warnings = [ln for ln in installed.build_log.splitlines() if _BUILD_WARNING.search(ln)]
    assert warnings == []


def test_the_sdist_carries_what_the_wheel_is_built_from(installed: Installed) -> None:
    with tarfile.open(installed.sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for need in (
        "guest_driver_c/vballoon_report_abi.h",  # the accelerator includes the ABI header
        "guest_driver_c/vballoon_report.c",
        "device/_accel/balloon_accel.c",
        "device/_accel/balloon_accel.h",
        "qemu-configs/base.args",
        "scripts/guest/memhog.c",
        "setup.py",
    ):
        assert need in names


def test_the_wheel_holds_the_accelerator_and_the_harness_data(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    assert any(re.fullmatch(r"device/_balloon_accel\..*so", n) for n in names)
    for need in (
        "vm_harness/_data/qemu-configs/balloon-vhost-user.args",
        "vm_harness/_data/qemu-configs/balloon-vfio-user.args",
        "vfio_user/py.typed",
        "virtio_pci/py.typed",
        "vm_harness/_data/guest/vbagent.c",
        "vm_harness/_data/guest_driver_c/vballoon_report_abi.h",
    ):
        assert need in names
    assert not any(n.startswith("tests/") for n in names)


def test_installed_code_comes_from_site_packages(installed: Installed) -> None:
    out = subprocess.run(
        [
            installed.bin("python"),
            "-c",
            "import device, vballoon, vhost_user, vfio_user, virtio_pci, "
            "vm_harness.resources as r; "
            "print(device.__file__, vballoon.__file__, vhost_user.__file__, "
            "vfio_user.__file__, virtio_pci.__file__, r.__file__); "
            "print(r.resource_dir('qemu-configs'))",
        ],
        cwd=installed.home,
        capture_output=True,
        text=True,
        env=clean_env(),
        check=True,
    ).stdout.split()
    assert all(str(installed.venv) in p for p in out), out


def test_installed_help_and_host_benchmarks(installed: Installed) -> None:
    res = installed.run("--help")
    assert res.returncode == 0 and "serve" in res.stdout and "demo" in res.stdout
    res = installed.run("bench", "discard", "--size", "64M", "--repeat", "1", "--json")
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert result["inflate_contig_vs_raw"] > 0 and result["machine"]["cores"] >= 1
    res = installed.run("bench", "vhost-user", "--size", "64M", "--repeat", "1", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["vhost_user_vs_inprocess"] > 0
    res = installed.run("bench", "vfio-user", "--size", "64M", "--repeat", "1", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["vfio_user_vs_inprocess"] > 0


def test_installed_serve_and_ctl(installed: Installed) -> None:
    sock, ctl = installed.home / "v.sock", installed.home / "c.sock"
    serve = subprocess.Popen(
        [installed.bin("vballoon"), "serve", "--socket", str(sock), "--control", str(ctl)],
        cwd=installed.home,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    try:
        wait_until(lambda: ctl.exists() or serve.poll() is not None, 20, "vballoon serve")
        assert serve.poll() is None
        res = installed.run("ctl", "--control", str(ctl), "info", "--json")
        assert res.returncode == 0, res.stderr
        info = json.loads(res.stdout)
        assert info["ram-size"] is None and "stats-vq" in info["features"]["offered-names"]
        res = installed.run("ctl", "--control", str(ctl), "target", "1G")
        assert res.returncode == 1 and "guest memory is not known yet" in res.stderr
    finally:
        serve.send_signal(signal.SIGTERM)
        _, err = serve.communicate(timeout=20)
    assert serve.returncode == 0, err
    assert not sock.exists() and not ctl.exists()


def test_installed_demo_says_in_one_line_what_it_needs(installed: Installed) -> None:
    """Without root and without a provisioned environment the VM demo cannot run."""
    usable = shutil.which("unshare") is not None and (
        subprocess.run(["unshare", "--user", "true"], capture_output=True).returncode == 0
    )
    if not usable:
        pytest.skip("needs unshare(1) and user namespaces to run the demo without root")
    env = {**clean_env(), "VBALLOON_TESTENV": str(installed.home / "no-testenv")}
    # In a new user namespace this process is uid 65534: not root, as a user would be.
    res = subprocess.run(
        ["unshare", "--user", "--", installed.bin("vballoon"), "demo"],
        cwd=installed.home,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    lines = (res.stdout + res.stderr).strip().splitlines()
    assert res.returncode == 1
    assert len(lines) == 1 and "needs root" in lines[0], lines
