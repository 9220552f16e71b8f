"""Build steps pyproject.toml cannot say: the C accelerator and the VM harness's data."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
#: vm_harness/_data/<name> <- <checkout>/<dir> (the same table as vm_harness/resources.py).
HARNESS_DATA = {
    "guest": "scripts/guest",
    "guest_driver_c": "guest_driver_c",
    "qemu-configs": "qemu-configs",
}
#: Build products a checkout may hold beside the sources; never packaged.
IGNORE = shutil.ignore_patterns("*.o", "*.ko", "*.mod*", ".*", "Module.symvers", "modules.order")


class BuildPy(build_py):
    """Also copy the guest's sources and the QEMU argument sets into the wheel, so an
    installed ``vballoon demo`` can provision and boot a guest without a checkout."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads them from the checkout
        for name, src in HARNESS_DATA.items():
            dst = Path(self.build_lib) / "vm_harness" / "_data" / name
            shutil.copytree(ROOT / src, dst, dirs_exist_ok=True, ignore=IGNORE)


setup(cffi_modules=["device/_accel_build.py:ffibuilder"], cmdclass={"build_py": BuildPy})
