# Type stub of the cffi-built extension (device/_accel_build.py): cffi gives no static types.
from typing import Any

ffi: Any
lib: Any
