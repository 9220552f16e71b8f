"""Provisioning the VM test environment: QEMU >= 10.2, a Linux 6.12 guest, a busybox initramfs.

:func:`provision` builds everything idempotently into a cache directory
(``$VBALLOON_TESTENV``, default ``~/.cache/vballoon/testenv``) and describes it as a
:class:`TestEnv` (``vm_harness.testenv.ensure_testenv`` adds the accelerator probe):

1. QEMU: a system ``qemu-system-x86_64`` >= 10.2 if there is one; otherwise QEMU 11.1 from
   trixie-backports inside the root below, run from the host through the root's loader.
2. A Debian 13 (trixie) root made with debootstrap (``<cache>/root``, needs root) with
   ``linux-image-cloud-amd64`` and ``linux-headers-cloud-amd64`` (6.12), ``gcc``, ``make``,
   ``busybox-static``. The guest kernel and the headers for out-of-tree modules come from it.
3. The guest image: a gzip'ed cpio (newc) initramfs with static busybox, our ``/init``
   (``scripts/guest/init``), the decompressed ``virtio_balloon.ko`` and our static guest tools
   ``memhog`` and ``vbagent`` (``scripts/guest/*.c``, built with the host's gcc). Rebuilt when
   any input changes (the inputs' hash is the stamp).

Each step writes its stamp in ``<cache>/stamps/`` only when it fully succeeded; a lock file
(``<cache>/lock``, :class:`Lock`) serialises concurrent runs. Failures raise
:class:`ProvisionError`, whose message is one line: the reason and what to install by hand.

Kernel command line switches understood by ``/init``: ``vballoon.load_balloon=1``
(insmod virtio_balloon), ``vballoon.noagent=1``. Extra files can be added to a boot with
:func:`write_cpio` + :func:`concat_initramfs` (scripts in ``/etc/vballoon.d/*.sh`` run before
readiness). Booting is :class:`vm_harness.vm.VM`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vm_harness.resources import resource_dir, user_cache_dir

#: Printed on the console (ttyS0) by /init when the guest is set up and the agent runs.
READY_MARKER = "VBALLOON-GUEST-READY"
#: Oldest system QEMU that has ``vhost-user-test-device-pci``.
MIN_SYSTEM_QEMU = (10, 2)
SUITE = "trixie"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
#: Packages installed into the root in every case.
BASE_PACKAGES = (
    "linux-image-cloud-amd64",
    "linux-headers-cloud-amd64",
    "gcc",
    "libc6-dev",  # static libc, for building the guest tools in the root if the host has no gcc
    "make",
    "busybox-static",
)
#: QEMU from trixie-backports; apt needs its same-source dependencies named too.
QEMU_PACKAGES = (
    "qemu-system-x86/trixie-backports",
    "qemu-system-common/trixie-backports",
    "qemu-system-data/trixie-backports",
    "seabios/trixie-backports",
)
#: Bump when the image layout changes without any input file changing.
GUEST_FORMAT = 1
#: How long the KVM probe waits for the readiness marker.
KVM_PROBE_TIMEOUT = 20.0
CFLAGS = ("-static", "-O2", "-Wall", "-Wextra", "-Werror")


class ProvisionError(RuntimeError):
    """Provisioning failed; ``str()`` is one line: the reason and what to do by hand."""

    def __init__(self, reason: str, hint: str = "") -> None:
        self.reason = reason
        self.hint = hint
        super().__init__(f"{reason}; {hint}" if hint else reason)


@dataclass(frozen=True)
class TestEnv:
    """Everything needed to boot the test guest.

    ``root``: the debootstrap root (host path), or None when no root is used.
    ``qemu_cmd``: the command prefix that runs QEMU from the host (arguments follow it).
    ``qemu_version``: e.g. ``"11.1.3"``. ``kernel``: bzImage (host path); ``kernel_version``:
    its ``uname -r``. ``headers_dir``: the kernel headers as a path *inside* the root, for
    ``chroot <root> make -C <headers_dir> M=<dir>`` (the host path is :meth:`host_path`).
    ``initramfs``: the guest image (None if not built). ``accel``: ``"kvm"`` or ``"tcg"``.
    ``cache``: the cache directory. ``modules_dir``: the guest kernel's ``/lib/modules/<ver>``
    (host path).
    """

    __test__ = False  # not a pytest test class

    cache: Path
    root: Path | None
    qemu_cmd: list[str]
    qemu_version: str
    kernel: Path
    kernel_version: str
    headers_dir: Path
    initramfs: Path | None
    accel: str
    modules_dir: Path

    def host_path(self, inside: Path | str) -> Path:
        """Host path of a path inside the root."""
        if self.root is None:
            return Path(inside)
        return self.root / Path(inside).relative_to("/")

    def chroot_cmd(self, *args: str) -> list[str]:
        """A command run inside the root (``chroot <root> args...``)."""
        if self.root is None:
            return list(args)
        return ["chroot", str(self.root), *args]

    def to_json(self) -> dict[str, object]:
        return {
            k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()
        }


# ---------------------------------------------------------------- small helpers


def progress(msg: str) -> None:
    """One progress line on stderr (provisioning takes minutes on a new machine)."""
    print(f"testenv: {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """``$VBALLOON_TESTENV``, else ``testenv`` in the user's cache directory."""
    env = os.environ.get("VBALLOON_TESTENV")
    return Path(env).resolve() if env else user_cache_dir() / "testenv"


def _run_logged(cmd: Sequence[str], log: Path, *, env: Mapping[str, str] | None = None) -> int:
    """Run cmd with output appended to log; return its exit code."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as f:
        f.write(f"\n$ {' '.join(cmd)}\n".encode())
        f.flush()
        full_env = {**os.environ, **(env or {})}
        return subprocess.run(
            list(cmd), stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env
        ).returncode


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


_NETWORK_ERRORS = (
    "Temporary failure resolving",
    "Could not resolve",
    "Failed getting release file",
    "Network is unreachable",
    "Connection timed out",
    "Could not connect",
    "Connection refused",
    "No route to host",
    "Unable to fetch",
    "Failed to fetch",
)


def _fail_from_log(what: str, log: Path, hint: str) -> ProvisionError:
    tail = _tail(log, 40)
    if any(e in tail for e in _NETWORK_ERRORS):
        return ProvisionError(
            f"{what} failed: no network to the Debian mirror (see {log})",
            "connect the machine to a Debian mirror or set VBALLOON_MIRROR; " + hint,
        )
    last = next((ln for ln in reversed(tail.splitlines()) if ln.strip()), "")
    return ProvisionError(f"{what} failed ({last.strip()[:160]}; full log {log})", hint)


def _mirror() -> str:
    """The Debian mirror: ``$VBALLOON_MIRROR``, else the host's apt configuration."""
    env = os.environ.get("VBALLOON_MIRROR")
    if env:
        return env.rstrip("/")
    texts: list[str] = []
    for p in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        with contextlib.suppress(OSError):
            if p.is_file() and p.suffix in ("", ".list", ".sources"):
                texts.append(p.read_text())
    for text in texts:
        for m in re.finditer(r"(?:^deb\s+(?:\[[^\]]*\]\s+)?|^URIs:\s*)(\S+)", text, re.M):
            uri = m.group(1).rstrip("/")
            if uri.startswith("http") and uri.endswith("/debian"):
                return uri
    return DEFAULT_MIRROR


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def _qemu_version(cmd: Sequence[str]) -> str | None:
    try:
        out = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"QEMU emulator version (\d+\.\d+(?:\.\d+)?)", out)
    return m.group(1) if m else None


def _system_qemu() -> tuple[list[str], str] | None:
    """The system QEMU if it is new enough (``$VBALLOON_NO_SYSTEM_QEMU=1`` ignores it)."""
    if os.environ.get("VBALLOON_NO_SYSTEM_QEMU") == "1":
        return None
    path = shutil.which("qemu-system-x86_64")
    if not path:
        return None
    version = _qemu_version([path])
    if version and _version_tuple(version)[:2] >= MIN_SYSTEM_QEMU:
        return [path], version
    return None


def root_qemu_cmd(root: Path) -> list[str]:
    """Command prefix that runs the root's QEMU from the host through the root's loader."""
    libs = f"{root}/usr/lib/x86_64-linux-gnu:{root}/lib/x86_64-linux-gnu"
    return [
        f"{root}/lib64/ld-linux-x86-64.so.2",
        "--library-path",
        libs,
        f"{root}/usr/bin/qemu-system-x86_64",
        "-L",
        f"{root}/usr/share/qemu",
        "-L",
        f"{root}/usr/share/seabios",
    ]


class Lock:
    """An exclusive flock on ``<cache>/lock`` (blocking, with a message when it waits)."""

    def __init__(self, cache: Path) -> None:
        cache.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(cache / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def __enter__(self) -> Lock:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress("waiting for another provisioning run to finish (lock held)")
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _read_stamp(cache: Path, name: str) -> dict[str, object] | None:
    try:
        data = json.loads((cache / "stamps" / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_stamp(cache: Path, name: str, data: Mapping[str, object]) -> None:
    d = cache / "stamps"
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{name}.json.tmp"
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, d / f"{name}.json")


def _clear_stamp(cache: Path, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (cache / "stamps" / f"{name}.json").unlink()


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve())
    found = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4].replace("\\040", " ")
            if mnt == prefix or mnt.startswith(prefix + "/"):
                found.append(mnt)
    return sorted(found, key=len, reverse=True)


def _remove_tree(path: Path) -> None:
    """rm -rf a (partial) root, unmounting what a killed debootstrap left mounted in it."""
    if not path.exists():
        return
    for mnt in _mounts_under(path):
        subprocess.run(["umount", "-l", mnt], check=False)
    if _mounts_under(path):
        raise ProvisionError(
            f"cannot remove {path}: something is still mounted in it", "unmount it by hand"
        )
    shutil.rmtree(path)


# ---------------------------------------------------------------- provisioning steps


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise ProvisionError(
            f"{what} needs root (debootstrap and chroot)",
            "run it once as root (sudo python -m vm_harness provision, or sudo make test from "
            "a checkout), or install qemu-system-x86 >= 10.2 and a 6.12 kernel by hand",
        )


def _ensure_debootstrap(cache: Path) -> str:
    found = shutil.which("debootstrap") or (
        "/usr/sbin/debootstrap" if os.path.exists("/usr/sbin/debootstrap") else None
    )
    if found:
        return found
    if not shutil.which("apt-get"):
        raise ProvisionError(
            "debootstrap is missing and there is no apt-get", "install debootstrap"
        )
    progress("installing debootstrap on the host (apt-get update; apt-get install debootstrap)")
    log = cache / "logs" / "host-apt.log"
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    if _run_logged(["apt-get", "update"], log, env=env) != 0:
        raise _fail_from_log("apt-get update on the host", log, "apt-get install debootstrap")
    if _run_logged(["apt-get", "install", "-y", "debootstrap"], log, env=env) != 0:
        raise _fail_from_log("apt-get install debootstrap", log, "apt-get install debootstrap")
    found = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not os.path.exists(found):
        raise ProvisionError("debootstrap did not install", "apt-get install debootstrap")
    return found


def _ensure_root(cache: Path) -> Path:
    """Step 1: a minimal Debian trixie root in ``<cache>/root``."""
    root = cache / "root"
    mirror = _mirror()
    stamp = _read_stamp(cache, "root")
    if stamp and stamp.get("suite") == SUITE and root.is_dir():
        return root
    _need_root("making the Debian root")
    debootstrap = _ensure_debootstrap(cache)
    _clear_stamp(cache, "packages")
    _clear_stamp(cache, "root")
    partial = cache / "root.partial"
    _remove_tree(partial)
    _remove_tree(root)
    log = cache / "logs" / "debootstrap.log"
    progress(f"debootstrap {SUITE} from {mirror} into {root} (about a minute; log {log})")
    t0 = time.monotonic()
    rc = _run_logged([debootstrap, "--variant=minbase", SUITE, str(partial), mirror], log)
    if rc != 0:
        _remove_tree(partial)
        raise _fail_from_log(
            "debootstrap", log, f"check `debootstrap {SUITE} /tmp/x {mirror}` by hand"
        )
    os.replace(partial, root)
    _write_stamp(cache, "root", {"suite": SUITE, "mirror": mirror})
    progress(f"debootstrap done in {time.monotonic() - t0:.0f} s")
    return root


def _ensure_packages(cache: Path, root: Path, with_qemu: bool) -> None:
    """Step 2: kernel, headers, gcc, make, busybox-static (and QEMU) into the root."""
    packages = list(BASE_PACKAGES) + (list(QEMU_PACKAGES) if with_qemu else [])
    mirror = _mirror()
    stamp = _read_stamp(cache, "packages")
    if stamp and stamp.get("packages") == packages:
        return
    _need_root("installing packages into the Debian root")
    _clear_stamp(cache, "packages")
    (root / "etc/apt/sources.list").write_text(
        "".join(
            f"deb {mirror} {suite} main\n"
            for suite in (SUITE, f"{SUITE}-updates", f"{SUITE}-backports")
        )
    )
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\n# no services in the vballoon test root\nexit 101\n")
    policy.chmod(0o755)
    log = cache / "logs" / "packages.log"
    env = {"DEBIAN_FRONTEND": "noninteractive", "INITRD": "No", "LC_ALL": "C"}
    hint = f"chroot {root} apt-get install " + " ".join(packages)
    progress(f"installing into the root: {' '.join(packages)} (about a minute; log {log})")
    t0 = time.monotonic()
    # Finish whatever a killed earlier run left half-installed (a no-op otherwise).
    _run_logged(["chroot", str(root), "dpkg", "--configure", "-a"], log, env=env)
    if _run_logged(["chroot", str(root), "apt-get", "update"], log, env=env) != 0:
        raise _fail_from_log("apt-get update in the root", log, hint)
    cmd = ["chroot", str(root), "apt-get", "install", "-y", "--no-install-recommends", *packages]
    if _run_logged(cmd, log, env=env) != 0:
        raise _fail_from_log("apt-get install in the root", log, hint)
    _run_logged(["chroot", str(root), "apt-get", "clean"], log, env=env)
    _write_stamp(cache, "packages", {"packages": packages, "mirror": mirror})
    progress(f"packages installed in {time.monotonic() - t0:.0f} s")


def _find_kernel(root: Path) -> tuple[Path, str]:
    kernels = sorted(
        (root / "boot").glob("vmlinuz-*"),
        key=lambda p: _version_tuple(p.name.removeprefix("vmlinuz-")),
    )
    if not kernels:
        raise ProvisionError(
            f"no guest kernel in {root}/boot",
            f"chroot {root} apt-get install linux-image-cloud-amd64",
        )
    k = kernels[-1]
    return k, k.name.removeprefix("vmlinuz-")


# ---------------------------------------------------------------- the guest image


def write_cpio(out: Path, files: Mapping[str, bytes | Path], *, compress: bool = True) -> Path:
    """Write a cpio (newc) archive holding ``files`` (guest path -> content), gzip'ed.

    Parent directories are created; files are mode 0755. Such an archive can be
    concatenated after the test initramfs (:func:`concat_initramfs`) to add files to one boot.
    """
    entries: list[tuple[str, int, bytes, tuple[int, int]]] = []
    dirs: set[str] = set()
    for name in sorted(files):
        parts = name.strip("/").split("/")
        for i in range(1, len(parts)):
            dirs.add("/".join(parts[:i]))
    for d in sorted(dirs):
        entries.append((d, stat.S_IFDIR | 0o755, b"", (0, 0)))
    for name in sorted(files):
        content = files[name]
        data = content.read_bytes() if isinstance(content, Path) else content
        entries.append((name.strip("/"), stat.S_IFREG | 0o755, data, (0, 0)))
    raw = _cpio_bytes(entries)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(gzip.compress(raw, compresslevel=6, mtime=0) if compress else raw)
    os.replace(tmp, out)
    return out


def concat_initramfs(out: Path, *parts: Path) -> Path:
    """Concatenate initramfs archives into ``out`` (Linux unpacks them in order)."""
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("wb") as f:
        for p in parts:
            f.write(p.read_bytes())
    os.replace(tmp, out)
    return out


def _cpio_bytes(entries: Sequence[tuple[str, int, bytes, tuple[int, int]]]) -> bytes:
    """newc cpio: (name, mode, data, (rdev major, minor)) entries, then the trailer."""
    out = bytearray()

    def add(ino: int, name: str, mode: int, data: bytes, rdev: tuple[int, int]) -> None:
        namez = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(namez), 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields))
        out.extend(namez)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, data, rdev) in enumerate(entries, start=1):
        add(ino, name, mode, data, rdev)
    add(0, "TRAILER!!!", 0, b"", (0, 0))
    return bytes(out)


def _gcc_cmd(root: Path | None) -> tuple[list[str], bool]:
    """The compiler for the guest tools: host gcc, else the root's (second item: in chroot)."""
    if shutil.which("gcc"):
        return ["gcc"], False
    if root is not None and (root / "usr/bin/gcc").exists():
        return ["chroot", str(root), "gcc"], True
    raise ProvisionError("no gcc to build the guest tools", "apt-get install gcc libc6-dev")


def _guest_inputs(root: Path, kernel_version: str) -> dict[str, Path]:
    mod_xz = root / f"lib/modules/{kernel_version}/kernel/drivers/virtio/virtio_balloon.ko.xz"
    mod_plain = mod_xz.with_suffix("")
    busybox = root / "usr/bin/busybox"
    if not busybox.exists():
        busybox = root / "bin/busybox"
    guest_src = resource_dir("guest")
    inputs = {
        "init": guest_src / "init",
        "memhog.c": guest_src / "memhog.c",
        "vbagent.c": guest_src / "vbagent.c",
        "busybox": busybox,
        "virtio_balloon": mod_xz if mod_xz.exists() else mod_plain,
    }
    for what, p in inputs.items():
        if not p.exists():
            raise ProvisionError(f"guest image input {what} missing: {p}", "run provision again")
    return inputs


def _compile(gcc: list[str], in_chroot: bool, root: Path, src: Path, out: Path) -> None:
    if in_chroot:
        tmpdir = root / "tmp" / "vballoon-build"
        tmpdir.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, tmpdir / src.name)
        cmd = [
            *gcc,
            *CFLAGS,
            "-o",
            f"/tmp/vballoon-build/{out.name}",
            f"/tmp/vballoon-build/{src.name}",
        ]
        built = tmpdir / out.name
    else:
        cmd = [*gcc, *CFLAGS, "-o", str(out), str(src)]
        built = out
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise ProvisionError(
            f"building {src.name} failed: {res.stderr.strip().splitlines()[-1:]}",
            "install gcc and libc6-dev (static libc) and check the source",
        )
    if built != out:
        shutil.copy(built, out)


def _ensure_guest(cache: Path, root: Path, kernel_version: str) -> Path:
    """Step 3: the initramfs; rebuilt when the hash of its inputs changes."""
    inputs = _guest_inputs(root, kernel_version)
    gcc, in_chroot = _gcc_cmd(root)
    gcc_version = subprocess.run(
        [*gcc, "--version"], capture_output=True, text=True
    ).stdout.splitlines()[:1]
    h = hashlib.sha256()
    h.update(f"format={GUEST_FORMAT} kernel={kernel_version} gcc={gcc_version}".encode())
    for name in sorted(inputs):
        h.update(name.encode() + b"\0" + inputs[name].read_bytes())
    digest = h.hexdigest()
    out = cache / "guest" / "initramfs.cpio.gz"
    stamp = _read_stamp(cache, "guest")
    if stamp and stamp.get("hash") == digest and out.exists():
        return out
    _clear_stamp(cache, "guest")
    t0 = time.monotonic()
    progress("building the guest image (memhog, vbagent, busybox initramfs)")
    build = cache / "guest" / "build"
    build.mkdir(parents=True, exist_ok=True)
    for tool in ("memhog", "vbagent"):
        _compile(gcc, in_chroot, root, inputs[f"{tool}.c"], build / tool)
    mod = inputs["virtio_balloon"]
    mod_bytes = lzma.decompress(mod.read_bytes()) if mod.suffix == ".xz" else mod.read_bytes()

    entries: list[tuple[str, int, bytes, tuple[int, int]]] = []
    for d in (
        "bin",
        "dev",
        "etc",
        "etc/vballoon.d",
        "lib",
        "lib/modules",
        "proc",
        "root",
        "run",
        "sbin",
        "sys",
        "tmp",
        "usr",
        "usr/bin",
        "usr/sbin",
    ):
        entries.append((d, stat.S_IFDIR | (0o1777 if d == "tmp" else 0o755), b"", (0, 0)))
    entries += [
        ("dev/console", stat.S_IFCHR | 0o600, b"", (5, 1)),
        ("dev/null", stat.S_IFCHR | 0o666, b"", (1, 3)),
        ("bin/busybox", stat.S_IFREG | 0o755, inputs["busybox"].read_bytes(), (0, 0)),
        ("bin/sh", stat.S_IFLNK | 0o777, b"busybox", (0, 0)),
        ("bin/memhog", stat.S_IFREG | 0o755, (build / "memhog").read_bytes(), (0, 0)),
        ("bin/vbagent", stat.S_IFREG | 0o755, (build / "vbagent").read_bytes(), (0, 0)),
        ("init", stat.S_IFREG | 0o755, inputs["init"].read_bytes(), (0, 0)),
        ("lib/modules/virtio_balloon.ko", stat.S_IFREG | 0o644, mod_bytes, (0, 0)),
        ("etc/vballoon-kernel", stat.S_IFREG | 0o644, kernel_version.encode() + b"\n", (0, 0)),
    ]
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(gzip.compress(_cpio_bytes(entries), compresslevel=6, mtime=0))
    os.replace(tmp, out)
    _write_stamp(cache, "guest", {"hash": digest, "kernel": kernel_version})
    progress(f"guest image {out} built in {time.monotonic() - t0:.1f} s")
    return out


def provision(cache: Path, *, build_guest: bool = True) -> TestEnv:
    """Provision (or reuse) everything in ``cache`` and describe it; hold :class:`Lock` first.

    ``accel`` is ``"tcg"`` here (the probe boots a guest: ``vm_harness.vm.probe_accel``).
    With ``build_guest=False`` the guest image is not built: ``initramfs`` is None.

    :raise ProvisionError: with the reason and what to do by hand.
    """
    system = _system_qemu()
    root = _ensure_root(cache)
    _ensure_packages(cache, root, with_qemu=system is None)
    if system is not None:
        qemu_cmd, qemu_version = system
    else:
        qemu_cmd = root_qemu_cmd(root)
        found = _qemu_version(qemu_cmd)
        if found is None:
            _clear_stamp(cache, "packages")
            raise ProvisionError(
                f"QEMU in {root} does not run from the host",
                "run provision again, or install qemu-system-x86 >= 10.2 on the host",
            )
        qemu_version = found
    kernel, kernel_version = _find_kernel(root)
    headers = Path(f"/usr/src/linux-headers-{kernel_version}")
    if not (root / headers.relative_to("/")).is_dir():
        _clear_stamp(cache, "packages")
        raise ProvisionError(
            f"kernel headers {headers} missing in {root}",
            f"chroot {root} apt-get install linux-headers-{kernel_version}",
        )
    initramfs = _ensure_guest(cache, root, kernel_version) if build_guest else None
    return TestEnv(
        cache=cache,
        root=root,
        qemu_cmd=qemu_cmd,
        qemu_version=qemu_version,
        kernel=kernel,
        kernel_version=kernel_version,
        headers_dir=headers,
        initramfs=initramfs,
        accel="tcg",
        modules_dir=root / "lib" / "modules" / kernel_version,
    )
