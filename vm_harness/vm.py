"""The one QEMU launcher: a Linux guest with vballoon (over vhost-user or vfio-user), QEMU's
own balloon, or none.

Used by the VM tests, ``vballoon demo``, the VM benchmark, the studies and the
accelerator probe. ``VM`` is a context manager that always tears everything
down (QEMU, ``vballoon serve``, sockets), also when a step fails; QEMU gets
SIGKILL if the thread that started it dies first. QEMU's QMP and vballoon's control socket are both
driven with ``qemu.qmp``; they answer the same balloon commands, so a test
runs the same assertions against either balloon.

Host-side readings come from outside QEMU: the guest RAM file's allocated
blocks through ``/proc/<qemu>/fd`` (what the host really holds), and the CPU
time of QEMU and vballoon from ``/proc/<pid>/stat``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from qemu.qmp.legacy import QEMUMonitorProtocol

from vballoon.waiting import WaitTimeout, wait_until
from vm_harness.guest_agent import GuestAgent
from vm_harness.provision import KVM_PROBE_TIMEOUT, READY_MARKER, TestEnv, progress
from vm_harness.resources import resource_dir

T = TypeVar("T")


class VMError(RuntimeError):
    """Something about the VM did not go as it must (boot, command, wait)."""


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """:func:`vballoon.waiting.wait_until`, failing with :class:`VMError`."""
    try:
        return wait_until(predicate, timeout, what, interval)
    except WaitTimeout as err:
        raise VMError(str(err)) from None


def config_args(name: str, values: dict[str, str]) -> list[str]:
    """The arguments of ``qemu-configs/<name>.args`` with ``${VAR}`` filled in.

    :raise VMError: if a placeholder has no value.
    """
    out = []
    for line in (resource_dir("qemu-configs") / f"{name}.args").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue

        def sub(m: re.Match[str]) -> str:
            try:
                return values[m.group(1)]
            except KeyError:
                raise VMError(f"{name}.args needs ${{{m.group(1)}}}") from None

        out.append(re.sub(r"\$\{(\w+)\}", sub, line))
    return out


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), or of one ``thread``."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class VMOptions:
    """How to build one VM."""

    #: ``vballoon``: vballoon over vhost-user; ``vfio-user``: vballoon as a virtio-pci
    #: function over vfio-user; ``qemu``: QEMU's own; ``none``: no balloon device at all
    #: (e.g. the accelerator probe)
    balloon: Literal["vballoon", "vfio-user", "qemu", "none"] = "vballoon"
    mem_mib: int = 1024
    cpus: int = 1
    memory: Literal["memfd", "hugetlbfs"] = "memfd"
    hugetlbfs: str | None = None
    #: extra ``vballoon serve`` options (e.g. ``--no-reporting``)
    vballoon_args: Sequence[str] = ()
    #: QEMU balloon properties, e.g. ``{"free-page-reporting": "on"}``
    builtin_props: dict[str, str] = field(default_factory=dict)
    load_balloon: bool = True
    append: str = ""
    num_vqs: int = 6
    boot_timeout: float = 120.0
    #: boot this initramfs instead of the test environment's (e.g. one with extra modules)
    initramfs: str | None = None
    #: ``kvm`` or ``tcg`` instead of the test environment's probed accelerator
    accel: str | None = None
    #: let a reset (QMP ``system_reset``, a guest reboot) restart the guest instead of
    #: ending QEMU (``-no-reboot`` otherwise)
    reboot: bool = False
    #: a migration destination: ``-incoming defer``, the balloon's root port but not the
    #: balloon (vballoon, if used, is started and waits for ``vballoon migrate`` to plug
    #: the device); :meth:`VM.start` does not wait for a guest
    incoming: bool = False
    #: more QEMU arguments, appended as given (e.g. an ``-object iothread``)
    extra_args: Sequence[str] = ()


class VM:
    """One guest; use as ``with VM(env, VMOptions(...)) as vm:``."""

    def __init__(self, env: TestEnv, opts: VMOptions) -> None:
        self.env = env
        self.opts = opts
        self.workdir = Path(tempfile.mkdtemp(prefix="vballoon-vm-"))
        self.console_log = self.workdir / "console.log"
        self.vballoon_log = self.workdir / "vballoon.log"
        self.qmp_sock = str(self.workdir / "qmp.sock")
        self.agent_sock = str(self.workdir / "agent.sock")
        self.vhost_sock = str(self.workdir / "vhost.sock")
        self.vfio_sock = str(self.workdir / "vfio-user.sock")
        #: the QMP monitor vballoon's migration guard uses (vfio-user)
        self.guard_qmp_sock = str(self.workdir / "qmp-vballoon.sock")
        self.control_sock = str(self.workdir / "control.sock")
        #: QEMU's second monitor, for tools (``vballoon migrate``)
        self.tools_qmp_sock = str(self.workdir / "qmp-tools.sock")
        self.qemu: subprocess.Popen[bytes] | None = None
        self.backend: subprocess.Popen[bytes] | None = None
        self.qmp: QEMUMonitorProtocol | None = None
        self.ctl: QEMUMonitorProtocol | None = None
        self.agent: GuestAgent | None = None
        self._qemu_err = self.workdir / "qemu.stderr"

    # -- lifecycle ----------------------------------------------------------------

    def __enter__(self) -> VM:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _append(self) -> str:
        parts = ["console=ttyS0", "panic=-1", "quiet", "loglevel=4"]
        if self.opts.load_balloon:
            parts.append("vballoon.load_balloon=1")
        if self.opts.append:
            parts.append(self.opts.append)
        return " ".join(parts)

    def qemu_args(self) -> list[str]:
        o = self.opts
        values = {
            "ACCEL": o.accel or self.env.accel,
            "CPUS": str(o.cpus),
            "MEM_MIB": str(o.mem_mib),
            "KERNEL": str(self.env.kernel),
            "INITRD": str(o.initramfs or self.env.initramfs),
            "APPEND": self._append(),
            "CONSOLE_LOG": str(self.console_log),
            "AGENT_SOCK": self.agent_sock,
            "QMP_SOCK": self.qmp_sock,
            "TOOLS_QMP_SOCK": self.tools_qmp_sock,
            "HUGETLBFS": o.hugetlbfs or "",
            "VHOST_SOCK": self.vhost_sock,
            "VFIO_SOCK": self.vfio_sock,
            "GUARD_QMP_SOCK": self.guard_qmp_sock,
            "NUM_VQS": str(o.num_vqs),
            "BUILTIN_PROPS": "".join(f",{k}={v}" for k, v in o.builtin_props.items()),
        }
        args = config_args("base", values) + config_args(f"memory-{o.memory}", values)
        if o.reboot:
            args = [a for a in args if a != "-no-reboot"]
        args += list(o.extra_args)
        if o.incoming:
            args += ["-incoming", "defer"]
        if o.balloon == "vballoon":
            args += config_args("balloon-port", values)
            if not o.incoming:
                args += config_args("balloon-vhost-user", values)
        elif o.balloon == "vfio-user":
            args += config_args("balloon-vfio-user", values)
        elif o.balloon == "qemu":
            args += config_args("balloon-builtin", values)
        return args

    def launch(self) -> None:
        """Start vballoon (if used), then QEMU; do not wait for the guest."""
        if self.is_vballoon:
            self._start_vballoon()
        with open(self._qemu_err, "wb") as err:
            self.qemu = subprocess.Popen(
                [*self.env.qemu_cmd, *self.qemu_args()],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )

    def start(self) -> None:
        """:meth:`launch`, connect to QMP, then wait until the guest's agent answers."""
        self.launch()
        wait_for(lambda: os.path.exists(self.qmp_sock) or self._qemu_died(), 30, "QEMU's QMP")
        self._check_alive("starting")
        self.qmp = QEMUMonitorProtocol(self.qmp_sock)
        self.qmp.connect(negotiate=True)
        if self.is_vballoon:
            self.ctl = QEMUMonitorProtocol(self.control_sock)
            self.ctl.connect(negotiate=True)
        else:
            self.ctl = self.qmp
        if not self.opts.incoming:
            self.attach_agent(self.opts.boot_timeout)

    def attach_agent(self, timeout: float) -> None:
        """Connect to the guest's agent and wait until it answers (after boot, or after
        an incoming migration)."""
        self.agent = GuestAgent(self.agent_sock, console_log=str(self.console_log))
        try:
            self.agent.wait_ready(timeout)
        except Exception as err:
            raise VMError(f"guest did not come up: {err}\n{self.diagnostics()}") from err

    @property
    def is_vballoon(self) -> bool:
        """Whether the balloon is vballoon (over either transport)."""
        return self.opts.balloon in ("vballoon", "vfio-user")

    def _start_vballoon(self) -> None:
        if self.opts.balloon == "vfio-user":
            where = ["--vfio-user", self.vfio_sock, "--qemu-qmp", self.guard_qmp_sock]
        else:
            where = ["--socket", self.vhost_sock]
        cmd = [
            sys.executable,
            "-m",
            "vballoon.cli",
            "serve",
            *where,
            "--control",
            self.control_sock,
            "--stats-interval",
            "1",
            "--log-level",
            "info",
            *self.opts.vballoon_args,
        ]
        with open(self.vballoon_log, "wb") as log:
            self.backend = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        backend = self.backend
        wait_for(
            lambda: os.path.exists(self.control_sock) or backend.poll() is not None,
            30,
            "vballoon serve",
        )
        if backend.poll() is not None:
            raise VMError(f"vballoon serve exited: {self.vballoon_log.read_text()}")

    def _qemu_died(self) -> bool:
        return self.qemu is not None and self.qemu.poll() is not None

    def console(self) -> str:
        """What the guest printed on its console so far."""
        try:
            return self.console_log.read_text(errors="replace")
        except OSError:
            return ""

    def qemu_stderr(self) -> str:
        """What QEMU printed so far."""
        try:
            return self._qemu_err.read_text(errors="replace")
        except OSError:
            return ""

    def _check_alive(self, what: str) -> None:
        if self._qemu_died():
            raise VMError(f"QEMU exited while {what}:\n{self.diagnostics()}")

    def diagnostics(self) -> str:
        """Tails of QEMU's stderr, the guest console and vballoon's log."""
        out = []
        for name, p in (
            ("qemu", self._qemu_err),
            ("console", self.console_log),
            ("vballoon", self.vballoon_log),
        ):
            with contextlib.suppress(OSError):
                tail = p.read_text(errors="replace").splitlines()[-25:]
                out.append(f"--- {name} ---\n" + "\n".join(tail))
        return "\n".join(out)

    def stop(self) -> None:
        """Tear everything down; safe to call twice and after a failed start."""
        if self.agent is not None:
            with contextlib.suppress(Exception):
                self.agent.close()
            self.agent = None
        asked_to_quit = False
        if self.qmp is not None and self.qemu is not None and self.qemu.poll() is None:
            with contextlib.suppress(Exception):
                self.qmp.cmd_raw("quit")
                asked_to_quit = True
        for mon in {id(m): m for m in (self.ctl, self.qmp) if m is not None}.values():
            with contextlib.suppress(Exception):
                mon.close()
        self.qmp = self.ctl = None
        # QEMU was asked to quit and gets time for it; vballoon is told at once (SIGTERM
        # is its normal shutdown, and it would wait forever for a next frontend).
        for proc, grace in ((self.qemu, 5.0 if asked_to_quit else 0.0), (self.backend, 0.0)):
            if proc is None or proc.poll() is not None:
                continue
            if grace:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=grace)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if os.environ.get("VBALLOON_KEEP_VM_LOGS"):
            return
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- guest commands -------------------------------------------------------------

    def run(self, cmd: str, timeout: float = 60.0) -> str:
        """Run ``cmd`` in the guest; its output. :raise VMError: on a non-zero exit."""
        assert self.agent is not None
        rc, out = self.agent.run(cmd, timeout=timeout)
        if rc != 0:
            raise VMError(f"guest command {cmd!r} exited {rc}: {out}")
        return out

    def run_rc(self, cmd: str, timeout: float = 60.0) -> tuple[int, str]:
        assert self.agent is not None
        return self.agent.run(cmd, timeout=timeout)

    def meminfo(self) -> dict[str, int]:
        """The guest's /proc/meminfo in bytes."""
        out = {}
        for line in self.run("cat /proc/meminfo").splitlines():
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                out[name] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
        return out

    # -- balloon (same commands for both balloons) -----------------------------------

    def _ctl(self, cmd: str, **args: Any) -> dict[str, Any]:
        """The raw QMP response (``return`` or ``error``) from the balloon's controller."""
        assert self.ctl is not None
        return self.ctl.cmd_raw(cmd, args or None)

    def balloon(self, guest_size: int) -> None:
        """Ask for the guest to have ``guest_size`` bytes (QEMU's ``balloon`` semantics)."""
        resp = self._ctl("balloon", value=guest_size)
        if "error" in resp:
            raise VMError(f"balloon {guest_size}: {resp['error']}")

    def actual(self) -> int:
        """The guest's current size as the balloon reports it (bytes)."""
        resp = self._ctl("query-balloon")
        if "error" in resp:
            raise VMError(f"query-balloon: {resp['error']}")
        return int(resp["return"]["actual"])

    def wait_actual(self, guest_size: int, timeout: float) -> float:
        """Wait until the guest reached ``guest_size``; the seconds it took."""
        t0 = time.monotonic()
        wait_for(lambda: self.actual() == guest_size, timeout, f"guest size {guest_size >> 20} MiB")
        return time.monotonic() - t0

    def vballoon_info(self) -> dict[str, Any]:
        resp = self._ctl("query-vballoon")
        if "error" in resp:
            raise VMError(f"query-vballoon: {resp['error']}")
        info: dict[str, Any] = resp["return"]
        return info

    # -- host-side readings --------------------------------------------------------------

    def _ram_fd_path(self) -> str:
        assert self.qemu is not None
        fd_dir = f"/proc/{self.qemu.pid}/fd"
        for name in os.listdir(fd_dir):
            with contextlib.suppress(OSError):
                target = os.readlink(f"{fd_dir}/{name}")
                if "memfd:mem" in target or (
                    self.opts.hugetlbfs and target.startswith(self.opts.hugetlbfs)
                ):
                    return f"{fd_dir}/{name}"
        raise VMError("cannot find the guest RAM file among QEMU's fds")

    def host_ram_bytes(self) -> int:
        """Bytes of guest RAM the host really holds (the RAM file's allocated blocks)."""
        return os.stat(self._ram_fd_path()).st_blocks * 512

    def qemu_cpu(self) -> float:
        assert self.qemu is not None
        return cpu_seconds(self.qemu.pid)

    def vballoon_cpu(self) -> float:
        assert self.backend is not None
        return cpu_seconds(self.backend.pid)


@contextlib.contextmanager
def running_vm(env: TestEnv, **kw: Any) -> Iterator[VM]:
    """``with running_vm(env, balloon="qemu", mem_mib=1024) as vm:``"""
    with VM(env, VMOptions(**kw)) as vm:
        yield vm


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the launching thread dies (no stray QEMU if the
    test process is killed before its teardown runs)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


# -- the accelerator probe ---------------------------------------------------------------

#: QEMU messages that end a KVM probe early (the vCPU is dead, waiting is pointless).
_KVM_FATAL = ("KVM internal error", "emulation failure", "failed to initialize kvm")


def _kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def _boots(vm: VM, timeout: float) -> bool:
    """Whether the guest prints its readiness marker before ``timeout`` (or dies first)."""

    def settled() -> bool:
        if READY_MARKER in vm.console() or vm._qemu_died():
            return True
        return any(m in vm.qemu_stderr() for m in _KVM_FATAL)

    with contextlib.suppress(VMError):
        wait_for(settled, timeout, "the KVM probe guest", interval=0.1)
    return READY_MARKER in vm.console()


def probe_accel(env: TestEnv, *, force: bool = False, timeout: float = KVM_PROBE_TIMEOUT) -> str:
    """``"kvm"`` if the test guest boots to its readiness marker with KVM, else ``"tcg"``.

    The answer is cached in ``<cache>/accel.json`` for this QEMU, kernel and host kernel.
    """
    override = os.environ.get("VBALLOON_ACCEL")
    if override in ("kvm", "tcg"):
        return override
    key = {
        "qemu": env.qemu_version,
        "kernel": env.kernel_version,
        "host": os.uname().release,
        "kvm_dev": os.path.exists("/dev/kvm"),
    }
    cache_file = env.cache / "accel.json"
    if not force:
        with contextlib.suppress(OSError, ValueError):
            cached = json.loads(cache_file.read_text())
            if cached.get("key") == key and cached.get("accel") in ("kvm", "tcg"):
                return str(cached["accel"])
    accel, why = "tcg", "no usable /dev/kvm"
    if env.initramfs is None:
        return "tcg"  # no image to probe with: do not cache a guess
    if _kvm_usable():
        progress(f"probing KVM: booting the guest with -accel kvm (up to {timeout:.0f} s)")
        t0 = time.monotonic()
        opts = VMOptions(balloon="none", mem_mib=512, load_balloon=False, accel="kvm")
        vm = VM(env, opts)
        try:
            vm.launch()
            ok = _boots(vm, timeout)
            said = [
                ln.strip()
                for ln in vm.qemu_stderr().splitlines()
                if any(m in ln for m in _KVM_FATAL) or "error" in ln.lower()
            ]
        finally:
            vm.stop()
        if ok:
            accel, why = "kvm", f"guest ready in {time.monotonic() - t0:.1f} s"
        else:
            qlog = " | ".join(said[:2]) or "nothing"
            why = (
                f"the guest did not boot under KVM (gave up after {time.monotonic() - t0:.1f} s"
                f" of {timeout:.0f}; QEMU said: {qlog[-160:]})"
            )
    progress(f"accelerator: {accel} ({why})")
    tmp = cache_file.with_name("accel.json.tmp")
    tmp.write_text(json.dumps({"key": key, "accel": accel, "why": why}, indent=1))
    os.replace(tmp, cache_file)
    return accel
