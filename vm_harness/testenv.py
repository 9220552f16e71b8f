"""The VM test environment, ready to boot: provisioned (:mod:`vm_harness.provision`) and
with its accelerator probed (:func:`vm_harness.vm.probe_accel`)."""

from __future__ import annotations

import dataclasses
import time

from vm_harness.provision import Lock, ProvisionError, TestEnv, cache_dir, progress, provision
from vm_harness.vm import probe_accel

__all__ = ["ProvisionError", "TestEnv", "ensure_testenv"]


def ensure_testenv(*, build_guest: bool = True) -> TestEnv:
    """Provision (or reuse) everything, probe the accelerator, and describe it.

    With ``build_guest=False`` the guest image is neither built nor used for the KVM
    probe: ``initramfs`` is None and ``accel`` is the cached probe answer or ``"tcg"``.

    :raise ProvisionError: with the reason and what to do by hand.
    """
    cache = cache_dir()
    with Lock(cache):
        t0 = time.monotonic()
        env = provision(cache, build_guest=build_guest)
        env = dataclasses.replace(env, accel=probe_accel(env))
        elapsed = time.monotonic() - t0
        if elapsed > 5:
            progress(f"test environment ready in {elapsed:.0f} s")
        return env
