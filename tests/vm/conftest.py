"""The VM tests' shared fixture: the provisioned test environment, once per session."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vm_harness.testenv import ProvisionError, TestEnv, ensure_testenv


@pytest.fixture(scope="session")
def env() -> TestEnv:
    """QEMU, the guest kernel and image; provisioning failure fails the test (no skip)."""
    try:
        return ensure_testenv()
    except ProvisionError as err:
        pytest.fail(f"test environment provisioning failed: {err}", pytrace=False)


@pytest.fixture
def hugetlbfs() -> Iterator[str]:
    """A 2 MiB hugetlbfs mount with room for a 1 GiB guest (root only)."""
    if os.geteuid() != 0:
        pytest.fail("the hugetlbfs VM test needs root (nr_hugepages, mount)")
    path = "/proc/sys/vm/nr_hugepages"
    old = int(Path(path).read_text())
    Path(path).write_text(str(old + 540))
    got = int(Path(path).read_text())
    mnt = tempfile.mkdtemp(prefix="vballoon-huge-")
    subprocess.run(["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none", mnt], check=True)
    try:
        if got < old + 540:
            pytest.fail(f"could reserve only {got - old} huge pages")
        yield mnt
    finally:
        subprocess.run(["umount", mnt], check=False)
        os.rmdir(mnt)
        with open(path, "w") as f:
            f.write(str(old))
