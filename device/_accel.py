"""The compiled C data plane: import it, or fail saying how to build it.

There is no pure-Python fallback in the product; the reference model of each
decoder lives in tests/ for differential testing only.
"""

from typing import Any

#: A cffi C value (pointer, array, struct); cffi has no finer static types.
CData = Any

try:
    from device._balloon_accel import ffi, lib
except ImportError as err:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "vballoon's C accelerator (device._balloon_accel) is not built. Build it with "
        "'make dev' or 'pip install -e .' from the source tree (needs a C compiler and cffi)."
    ) from err

__all__ = ["CData", "ffi", "lib"]
