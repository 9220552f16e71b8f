"""The VM tests' shared fixture: the provisioned test environment, once per session."""

from __future__ import annotations

import pytest

from vm_harness.testenv import ProvisionError, TestEnv, ensure_testenv


@pytest.fixture(scope="session")
def env() -> TestEnv:
    """QEMU, the guest kernel and image; provisioning failure fails the test (no skip)."""
    try:
        return ensure_testenv()
    except ProvisionError as err:
        pytest.fail(f"test environment provisioning failed: {err}", pytrace=False)
