"""Build the guest module (guest_driver_c/) and boot it; drive it inside a guest.

:func:`build_module` compiles ``vballoon_report.ko`` against the test guest's kernel
headers inside the test environment's root (``chroot <root> make -C <headers>
M=/tmp/vballoon-mod-<hash>``) and caches the result by a hash of the sources and the
kernel. :func:`initramfs_with_module` appends the module (at :data:`GUEST_KO`) and a
hook that mounts debugfs to the test initramfs. The module is not loaded at boot:
``insmod`` it in the guest (:class:`ReportModule` does, through ``vm.run``).

CLI: ``python -m vm_harness.guest_module [build|initramfs]`` prints the path.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from vm_harness.provision import TestEnv, concat_initramfs, write_cpio
from vm_harness.resources import resource_dir
from vm_harness.testenv import ensure_testenv

#: The module's sources; None: the checkout's or the installed package's ``guest_driver_c``.
SOURCE_DIR: Path | None = None
MODULE = "vballoon_report"
#: Where the module sits in the guest.
GUEST_KO = f"/lib/vballoon/{MODULE}.ko"  # guest_path(MODULE)
#: The module's debugfs directory in the guest.
DEBUGFS = "/sys/kernel/debug/vballoon"
#: Bump when the build or the image layout changes without a source changing.
FORMAT = 1
#: Builds (and images) kept in the cache; older ones are removed.
KEEP = 6

#: Run by the guest's /init before readiness (scripts in /etc/vballoon.d/).
DEBUGFS_HOOK = b"""#!/bin/sh
# vballoon_report's controls live in debugfs: mount it once.
grep -qs ' /sys/kernel/debug ' /proc/mounts || mount -t debugfs none /sys/kernel/debug
"""

#: Encodings as the module's ``encoding`` file names them.
ENCODINGS = ("pfn_len", "pfn_order", "bitmap")


class ModuleBuildError(RuntimeError):
    """The module did not build (or built with warnings); the message has the output."""


def source_dir() -> Path:
    """Where the module's sources are read from."""
    return SOURCE_DIR if SOURCE_DIR is not None else resource_dir("guest_driver_c")


def _sources(src: Path) -> list[Path]:
    files = sorted(
        p
        for p in src.iterdir()
        if p.is_file() and (p.suffix in (".c", ".h") or p.name in ("Kbuild", "Makefile"))
    )
    if not any(p.suffix == ".c" for p in files):
        raise ModuleBuildError(f"no C sources in {src}")
    return files


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _cache(env: TestEnv) -> Path:
    return env.cache / "guest-module"


def _prune(directory: Path, pattern: str) -> None:
    """Remove all but the :data:`KEEP` newest files matching ``pattern``."""
    files = sorted(directory.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in files[KEEP:]:
        with contextlib.suppress(OSError):
            old.unlink()


_WARNING = re.compile(r"\bwarning\b", re.IGNORECASE)


def build_module(env: TestEnv, src: Path | None = None, module: str = MODULE) -> Path:
    """Build ``<module>.ko`` (default: ``vballoon_report.ko`` from :func:`source_dir`) for
    the test guest's kernel from the sources in ``src``; its host path.

    Cached in ``<cache>/guest-module/`` by a hash of the sources, the kernel version and
    the headers' path. The build runs in ``<root>/tmp/vballoon-mod-<hash>`` (removed
    afterwards). Compiler warnings are errors (``-Werror`` in Kbuild); a warning from any
    other step (modpost) fails the build here too.

    :raise ModuleBuildError: with the full build output if ``make`` fails or warns.
    """
    files = _sources(source_dir() if src is None else src)
    digest = _digest(
        f"format={FORMAT} kernel={env.kernel_version} headers={env.headers_dir}".encode(),
        *(p.name.encode() + b"\0" + p.read_bytes() for p in files),
    )[:20]
    out = _cache(env) / f"{module}-{digest}.ko"
    if out.exists():
        return out
    with _locked(_cache(env) / "lock"):
        if out.exists():
            return out
        inside = Path(f"/tmp/vballoon-mod-{digest}")
        build = env.host_path(inside)
        shutil.rmtree(build, ignore_errors=True)
        build.mkdir(parents=True)
        try:
            for p in files:
                shutil.copy(p, build / p.name)
            cmd = env.chroot_cmd("make", "-C", str(env.headers_dir), f"M={inside}", "modules")
            res = subprocess.run(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                stdin=subprocess.DEVNULL,
            )
            output = res.stdout
            ko = build / f"{module}.ko"
            warnings = [ln for ln in output.splitlines() if _WARNING.search(ln)]
            if res.returncode != 0 or not ko.exists() or warnings:
                why = (
                    f"make exited {res.returncode}"
                    if res.returncode != 0
                    else "the build printed warnings"
                    if warnings
                    else f"no {ko.name} came out"
                )
                raise ModuleBuildError(
                    f"building {module}.ko for {env.kernel_version} failed ({why}):\n"
                    f"$ {' '.join(cmd)}\n{output}"
                )
            tmp = out.with_name(out.name + ".tmp")
            shutil.copy(ko, tmp)
            os.replace(tmp, out)
            _prune(out.parent, f"{module}-*.ko")
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return out


def guest_path(module: str) -> str:
    """Where a module's ``.ko`` sits in the guest (:func:`initramfs_with_module`)."""
    return f"/lib/vballoon/{module}.ko"


def initramfs_with_module(env: TestEnv, ko: Path, module: str = MODULE) -> Path:
    """The test initramfs with ``ko`` at :func:`guest_path` and a debugfs mount hook.

    Cached in ``<cache>/guest-module/`` by a hash of the base image, the module and the hook.
    """
    if env.initramfs is None:
        raise ValueError("the test environment has no guest image (ensure_testenv())")
    base = env.initramfs.read_bytes()
    data = ko.read_bytes()
    digest = _digest(f"format={FORMAT}".encode(), base, data, DEBUGFS_HOOK)[:20]
    out = _cache(env) / f"initramfs-{module}-{digest}.cpio.gz"
    if out.exists():
        return out
    with _locked(_cache(env) / "lock"):
        if not out.exists():
            extra = write_cpio(
                _cache(env) / f"extra-{digest}.cpio.gz",
                {guest_path(module): data, "etc/vballoon.d/50-debugfs.sh": DEBUGFS_HOOK},
            )
            concat_initramfs(out, env.initramfs, extra)
            extra.unlink()
            _prune(out.parent, f"initramfs-{module}-*.cpio.gz")
    return out


# ---------------------------------------------------------------- in the guest


class _Runner(Protocol):
    def run(self, cmd: str, timeout: float = 60.0) -> str: ...

    def run_rc(self, cmd: str, timeout: float = 60.0) -> tuple[int, str]: ...


def parse_counters(text: str) -> dict[str, int]:
    """``name value`` lines (the module's counters, last_pass, info) as a dict."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[0]] = int(parts[1], 0)
    return out


def parse_fields(text: str) -> dict[str, str]:
    """``key=value key=value`` (the module's malformed result) as a dict."""
    return dict(w.split("=", 1) for w in text.split() if "=" in w)


class ReportModule:
    """The module inside a running guest (anything with ``run``/``run_rc``, e.g. a VM)."""

    def __init__(self, vm: _Runner, path: str = GUEST_KO) -> None:
        self.vm = vm
        self.path = path

    def load(self) -> None:
        self.vm.run(f"insmod {self.path}")

    def unload(self) -> None:
        self.vm.run(f"rmmod {MODULE}")

    def loaded(self) -> bool:
        return self.vm.run_rc(f"grep -q '^{MODULE} ' /proc/modules")[0] == 0

    def bound(self) -> bool:
        """Whether the driver bound a device (its debugfs directory exists)."""
        return self.vm.run_rc(f"test -d {DEBUGFS}")[0] == 0

    def set(self, **params: object) -> None:
        """Write parameters: ``set(encoding="bitmap", min_order=0, budget_mb=256)``."""
        for name, value in params.items():
            self.vm.run(f"echo {value} > {DEBUGFS}/{name}")

    def get(self, name: str) -> str:
        return self.vm.run(f"cat {DEBUGFS}/{name}").strip()

    def trigger(self, timeout: float = 300.0) -> tuple[int, str]:
        """Run one pass; the shell's exit code and output (non-zero if the pass failed)."""
        return self.vm.run_rc(f"echo 1 > {DEBUGFS}/trigger", timeout=timeout)

    def run_pass(self, timeout: float = 300.0) -> dict[str, int]:
        """Run one pass that must succeed; its ``last_pass`` numbers."""
        self.vm.run(f"echo 1 > {DEBUGFS}/trigger", timeout=timeout)
        return self.last_pass()

    def counters(self) -> dict[str, int]:
        return parse_counters(self.get("counters"))

    def last_pass(self) -> dict[str, int]:
        return parse_counters(self.get("last_pass"))

    def info(self) -> dict[str, int]:
        return parse_counters(self.get("info"))

    def malformed(self, case: str, timeout: float = 60.0) -> dict[str, str]:
        """Send the malformed report ``case``; the module's record of what came back."""
        self.vm.run(f"echo {case} > {DEBUGFS}/malformed", timeout=timeout)
        return parse_fields(self.get("malformed"))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    what = args[0] if args else "build"
    if what not in ("build", "initramfs"):
        print("usage: python -m vm_harness.guest_module [build|initramfs]", file=sys.stderr)
        return 2
    env = ensure_testenv()
    try:
        ko = build_module(env)
    except ModuleBuildError as err:
        print(err, file=sys.stderr)
        return 1
    print(ko if what == "build" else initramfs_with_module(env, ko))
    return 0


if __name__ == "__main__":
    sys.exit(main())
