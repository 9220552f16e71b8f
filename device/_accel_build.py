"""cffi build script for the C data plane (API mode, out of line).

Run by setuptools through ``cffi_modules`` in setup.py during
``pip install .`` / ``pip install -e .``; it produces ``device/_balloon_accel*.so``.
The header ``_accel/balloon_accel.h`` is both the cdef and the C interface.
"""

from pathlib import Path

from cffi import FFI

_HERE = Path(__file__).resolve().parent
_ACCEL = _HERE / "_accel"
# setuptools wants paths relative to setup.py (the project root).
_SOURCES = ["device/_accel/balloon_accel.c"]
_INCLUDES = ["device/_accel", "guest_driver_c"]

ffibuilder = FFI()
ffibuilder.cdef((_ACCEL / "balloon_accel.h").read_text())
ffibuilder.set_source(
    "device._balloon_accel",
    '#include "balloon_accel.h"\n',
    sources=_SOURCES,
    include_dirs=_INCLUDES,
    extra_compile_args=["-std=gnu99", "-O2", "-Wall", "-Wextra", "-Werror"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
