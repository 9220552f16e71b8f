"""Where the harness finds what it boots: the guest's init and tools, the guest module's
sources and the QEMU argument sets.

From a source checkout they are the checkout's own directories; from an installed
wheel they are package data (``vm_harness/_data/``, copied there at build time by
``setup.py``). The checkout wins when both exist, so edits are seen without a rebuild.
"""

from __future__ import annotations

import os
from pathlib import Path

_HERE = Path(__file__).resolve().parent
#: The source checkout this package would live in (if it is one).
CHECKOUT = _HERE.parent
#: Package data of an installed wheel.
PACKAGED = _HERE / "_data"

#: Resource name -> its directory in a checkout (packaged under ``_data/<name>``).
CHECKOUT_DIRS = {
    "guest": "scripts/guest",
    "guest_driver_c": "guest_driver_c",
    "qemu-configs": "qemu-configs",
}


class MissingResource(RuntimeError):
    """Neither the checkout nor the installed package has the files."""


def resource_dir(name: str) -> Path:
    """The directory holding resource ``name`` (a key of :data:`CHECKOUT_DIRS`).

    :raise MissingResource: if neither a checkout nor package data has it.
    """
    for candidate in (CHECKOUT / CHECKOUT_DIRS[name], PACKAGED / name):
        if candidate.is_dir():
            return candidate
    raise MissingResource(
        f"{name} not found in {CHECKOUT} or {PACKAGED}: reinstall vballoon, "
        "or run from a source checkout"
    )


def in_checkout() -> bool:
    """Whether this package runs from a source checkout (not an installed wheel)."""
    return (CHECKOUT / "pyproject.toml").is_file() and (CHECKOUT / "vm_harness").is_dir()


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/vballoon`` (default ``~/.cache/vballoon``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vballoon"
