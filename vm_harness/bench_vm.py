"""``vballoon bench vm``: the same guest with vballoon and with QEMU's own balloon.

vballoon runs over one transport per invocation (``--transport vhost-user``, the
default, or ``vfio-user``); the result keys are the same for both.

Each run boots a fresh guest, makes its free memory resident on the host,
inflates to a target and then lets free page reporting return 512 MiB the
guest touched and freed. Runs alternate between the two balloons; medians of
each are compared as vballoon / QEMU.

Device-side CPU: for vballoon, the ``vballoon serve`` process. QEMU's own
balloon runs in QEMU's main thread (the vCPUs are other threads under TCG), so
for QEMU the main thread's CPU time is taken (``/proc/<pid>/task/<pid>/stat``);
it includes a little unrelated main-loop work, which favours neither side
much. QEMU's whole-process CPU is reported beside it.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass

from vballoon.bench import machine
from vballoon.units import MiB
from vm_harness.provision import TestEnv
from vm_harness.vm import VM, VMOptions, cpu_seconds, wait_for


@dataclass
class RunResult:
    """One guest, one balloon."""

    inflate_time: float
    device_cpu: float
    qemu_cpu: float
    memory_returned: int
    report_time_to_80pct: float
    report_returned: int


#: ``--transport`` → the harness's balloon name for vballoon over it
TRANSPORTS = {"vhost-user": "vballoon", "vfio-user": "vfio-user"}
#: The goals per transport (the issues' numbers; vfio-user's reporting goal allows its
#: notify path through QEMU's proxy 10 %).
GOALS = {
    "vhost-user": {
        "inflate_time": "<= 1.0",
        "report_512m_time_to_80pct": "<= 1.0",
        "memory_returned": ">= 1.0",
        "inflate_device_cpu": "reported",
    },
    "vfio-user": {
        "inflate_time": "<= 1.0",
        "report_512m_time_to_80pct": "<= 1.1",
        "memory_returned": ">= 0.99",
        "inflate_device_cpu": "reported",
    },
}


def _progress(msg: str) -> None:
    print(f"bench vm: {msg}", file=sys.stderr, flush=True)


def one_run(
    env: TestEnv, balloon: str, mem_mib: int, target_mib: int, transport: str = "vhost-user"
) -> RunResult:
    """Boot, make memory resident, inflate, then measure free page reporting."""
    opts = (
        VMOptions(balloon=TRANSPORTS[transport], mem_mib=mem_mib)  # type: ignore[arg-type]
        if balloon == "vballoon"
        else VMOptions(balloon="qemu", mem_mib=mem_mib, builtin_props={"free-page-reporting": "on"})
    )
    with VM(env, opts) as vm:
        assert vm.qemu is not None
        free = vm.meminfo()["MemFree"] // MiB
        vm.run(f"memhog touch {free - 128}", timeout=600)
        # Let reporting of that free settle, then re-touch so everything is resident.
        time.sleep(3)
        vm.run(f"memhog touch {vm.meminfo()['MemFree'] // MiB - 128}", timeout=600)
        resident = vm.host_ram_bytes()

        def device_cpu() -> float:
            if balloon == "vballoon":
                return vm.vballoon_cpu()
            return cpu_seconds(vm.qemu.pid, thread=vm.qemu.pid)  # type: ignore[union-attr]

        cpu0, qcpu0 = device_cpu(), cpu_seconds(vm.qemu.pid)
        vm.balloon(target_mib * MiB)
        took = vm.wait_actual(target_mib * MiB, timeout=600)
        cpu1, qcpu1 = device_cpu(), cpu_seconds(vm.qemu.pid)
        returned = resident - vm.host_ram_bytes()

        # Free page reporting: back to full size, touch and free 512 MiB, time to 80% back.
        vm.balloon(mem_mib * MiB)
        vm.wait_actual(mem_mib * MiB, timeout=600)
        vm.run("memhog touch 512", timeout=600)
        t0 = time.monotonic()
        peak = vm.host_ram_bytes()
        wait_for(
            lambda: peak - vm.host_ram_bytes() >= 0.8 * 512 * MiB, 60, "80% of 512 MiB back", 0.05
        )
        t80 = time.monotonic() - t0
        time.sleep(2)
        report_returned = peak - vm.host_ram_bytes()
    return RunResult(took, cpu1 - cpu0, qcpu1 - qcpu0, returned, t80, report_returned)


def run_vm_bench(
    env: TestEnv,
    runs: int = 3,
    mem_mib: int = 2048,
    target_mib: int = 512,
    transport: str = "vhost-user",
) -> dict[str, object]:
    """Alternate ``runs`` runs per balloon; medians and ratios vballoon / QEMU."""
    results: dict[str, list[RunResult]] = {"vballoon": [], "qemu": []}
    for run in range(runs):
        for balloon in ("vballoon", "qemu"):
            name = f"vballoon ({transport})" if balloon == "vballoon" else "QEMU's balloon"
            _progress(f"run {run + 1}/{runs}, {name}")
            r = one_run(env, balloon, mem_mib, target_mib, transport)
            _progress(
                f"{name}: inflate {r.inflate_time:.1f} s, "
                f"reporting 80% in {r.report_time_to_80pct:.1f} s, "
                f"returned {r.memory_returned // MiB} MiB"
            )
            results[balloon].append(r)

    def med(balloon: str, attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in results[balloon]))

    out: dict[str, object] = {}
    for key, attr in (
        ("inflate_time", "inflate_time"),
        ("inflate_device_cpu", "device_cpu"),
        ("report_512m_time_to_80pct", "report_time_to_80pct"),
        ("memory_returned", "memory_returned"),
    ):
        v, q = med("vballoon", attr), med("qemu", attr)
        out[key] = round(v / q, 3) if q else None
    out["medians"] = {
        b: {attr: round(med(b, attr), 4) for attr in RunResult.__dataclass_fields__}
        for b in results
    }
    out["spread"] = {
        b: {
            attr: [
                round(min(getattr(r, attr) for r in rs), 4),
                round(max(getattr(r, attr) for r in rs), 4),
            ]
            for attr in RunResult.__dataclass_fields__
        }
        for b, rs in results.items()
    }
    out["goals"] = GOALS[transport]
    out["transport"] = transport
    out["guest"] = {
        "mem_mib": mem_mib,
        "target_mib": target_mib,
        "runs": runs,
        "accel": env.accel,
        "qemu": env.qemu_version,
        "kernel": env.kernel_version,
    }
    out["machine"] = machine()
    out["device_cpu_note"] = (
        "vballoon: the vballoon serve process; QEMU: its main thread, "
        "where the built-in balloon runs (qemu_cpu: whole QEMU process)"
    )
    return out


def format_vm_table(result: dict[str, object]) -> str:
    med = result["medians"]
    assert isinstance(med, dict)
    g = result["guest"]
    assert isinstance(g, dict)
    lines = [
        f"vballoon bench vm: {g['mem_mib']} MiB guest, target {g['target_mib']} MiB, "
        f"{g['runs']} runs each, medians ({g['accel']}, QEMU {g['qemu']}), "
        f"vballoon over {result['transport']}",
        "measured on {cpu}, {cores} cores, Linux {kernel}".format(**result["machine"]),  # type: ignore[arg-type]
        f"{'key':28} {'vballoon':>10} {'qemu':>10} {'ratio':>7}  goal",
    ]
    rows = (
        ("inflate_time", "inflate_time", "s"),
        ("inflate_device_cpu", "device_cpu", "s"),
        ("report_512m_time_to_80pct", "report_time_to_80pct", "s"),
        ("memory_returned", "memory_returned", "MiB"),
    )
    goals = result["goals"]
    assert isinstance(goals, dict)
    spread = result.get("spread")
    for key, attr, unit in rows:
        v, q = med["vballoon"][attr], med["qemu"][attr]
        scale = MiB if unit == "MiB" else 1
        line = (
            f"{key:28} {v / scale:10.3f} {q / scale:10.3f} {result[key]!s:>7}  "
            f"{goals[key]} ({unit})"
        )
        if isinstance(spread, dict):
            (v0, v1), (q0, q1) = spread["vballoon"][attr], spread["qemu"][attr]
            line += (
                f"  runs: vballoon {v0 / scale:.2f}-{v1 / scale:.2f}, "
                f"qemu {q0 / scale:.2f}-{q1 / scale:.2f}"
            )
        lines.append(line)
    lines.append(
        f"QEMU whole-process CPU during inflate: vballoon run "
        f"{med['vballoon']['qemu_cpu']:.2f} s, QEMU-balloon run {med['qemu']['qemu_cpu']:.2f} s"
    )
    return "\n".join(lines)
