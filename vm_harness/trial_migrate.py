"""``vballoon trial migrate``: what a balloon buys a live migration, variant by variant.

Every variant boots the same guest (1 GiB, TCG or KVM as the test environment probed),
runs the same workload (hold 128 MiB checksummed, then write and free nearly all the
rest), lets the guest's balloon do its work, and migrates it over a Unix socket to a
second QEMU on this host, QMP through qemu.qmp. Per variant: bytes sent (normal and
zero pages), total time, downtime, the source's guest RAM peak during the migration, the
destination's right after and 30 s later, the guest's checksum on the destination, and
the balloon there. vballoon variants migrate with ``vballoon migrate`` (unplug, migrate,
plug again).
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vballoon.bench import machine
from vballoon.units import MiB
from vm_harness.guest_module import ReportModule, build_module, initramfs_with_module
from vm_harness.plots import HOW_TO_GET, plot_bytes_sent
from vm_harness.provision import TestEnv
from vm_harness.vm import VM, VMOptions

GUEST_MIB = 1024
HOLD_MIB = 128
#: Seconds the destination's RAM is watched after the migration.
AFTER_S = 30.0


@dataclass(frozen=True)
class Variant:
    name: str
    what: str
    balloon: str  # VMOptions.balloon
    props: dict[str, str] = field(default_factory=dict)
    extra_args: tuple[str, ...] = ()
    #: run one pass of the guest module's range reports before migrating
    range_reports: bool = False
    #: inflate the balloon to this guest size before migrating
    target_mib: int | None = None
    #: ``vballoon migrate --trim``: the destination's zero pages punched, VM paused
    trim: bool = False


VARIANTS = (
    Variant("none", "no balloon", "none"),
    Variant(
        "qemu-reporting",
        "QEMU's balloon, free page reporting",
        "qemu",
        {"free-page-reporting": "on"},
    ),
    Variant(
        "qemu-hint",
        "QEMU's balloon, free page hinting",
        "qemu",
        {"free-page-hint": "on", "iothread": "vb-iothread"},
        ("-object", "iothread,id=vb-iothread"),
    ),
    Variant("vballoon-reporting", "vballoon (vhost-user), free page reporting", "vballoon"),
    Variant(
        "vballoon-reporting-trim",
        "vballoon (vhost-user), free page reporting, destination trimmed (migrate --trim)",
        "vballoon",
        trim=True,
    ),
    Variant(
        "vballoon-range-reports",
        "vballoon (vhost-user), one pass of the guest module's range reports",
        "vballoon",
        range_reports=True,
    ),
    Variant(
        "vballoon-half",
        "vballoon (vhost-user), balloon inflated to half the guest",
        "vballoon",
        target_mib=GUEST_MIB // 2,
    ),
)
#: Variants this QEMU cannot run, with the reason (printed as rows, not measured).
NOT_POSSIBLE = {
    "vballoon-vfio-user": "QEMU 11.1.3 migrates a vfio-user device without its state and "
    "aborts on its device_del: vballoon refuses such migrations (README)",
}


class TrialError(RuntimeError):
    pass


def _progress(msg: str) -> None:
    print(f"trial migrate: {msg}", file=sys.stderr, flush=True)


def _quiet(vm: VM, settle: float = 3.0, timeout: float = 90.0) -> None:
    """Until the host-side RAM stops moving (the balloon finished its work)."""
    last, since = vm.host_ram_bytes(), time.monotonic()
    end = time.monotonic() + timeout
    while time.monotonic() - since < settle and time.monotonic() < end:
        time.sleep(0.25)
        now = vm.host_ram_bytes()
        if abs(now - last) > 4 * MiB:
            last, since = now, time.monotonic()


def _workload(vm: VM) -> str:
    out = vm.run(f"memhog hold {HOLD_MIB} /tmp/h.sock 9", timeout=120)
    m = re.search(r"sum=([0-9a-f]+)", out)
    if not m:
        raise TrialError(f"memhog hold said: {out}")
    free = vm.meminfo()["MemFree"] // MiB
    vm.run(f"memhog touch {free - 96}", timeout=600)
    return m.group(1)


def _checksum(vm: VM) -> str:
    out = vm.run("memhog ask /tmp/h.sock sum", timeout=120)
    m = re.search(r"sum=([0-9a-f]+) bad_pages=(\d+)", out)
    return f"{m.group(1)}" if m and m.group(2) == "0" else f"bad: {out.strip()}"


def _options(v: Variant, image: str | None, incoming: bool) -> VMOptions:
    return VMOptions(
        balloon=v.balloon,  # type: ignore[arg-type]
        mem_mib=GUEST_MIB,
        builtin_props=dict(v.props),
        extra_args=v.extra_args,
        incoming=incoming,
        vballoon_args=(),
        initramfs=image if v.range_reports else None,
        load_balloon=not v.range_reports,
    )


def migrate_command(src: VM, dst: VM, uri: str, trim: bool = False) -> list[str]:
    """``vballoon migrate`` from ``src`` to ``dst`` (an incoming VM), as a process."""
    return [
        sys.executable, "-m", "vballoon.cli", "migrate",
        "--source-qmp", src.tools_qmp_sock, "--dest-qmp", dst.tools_qmp_sock,
        "--source-control", src.control_sock, "--dest-control", dst.control_sock,
        "--dest-socket", dst.vhost_sock, "--uri", uri, "--json",
        *(["--trim"] if trim else []),
    ]  # fmt: skip


def run_variant(env: TestEnv, v: Variant, image: str | None) -> dict[str, Any]:
    _progress(f"{v.name}: booting source and destination")
    with VM(env, _options(v, image, False)) as src, VM(env, _options(v, image, True)) as dst:
        assert src.qmp is not None and dst.qmp is not None
        checksum = _workload(src)
        if v.range_reports:
            mod = ReportModule(src)
            mod.load()
            mod.set(min_order=0, budget_pct=90, encoding="pfn_order")
            rc, out = mod.trigger()
            if rc:
                raise TrialError(f"range-report pass failed: {out}")
        if v.target_mib is not None:
            src.balloon(v.target_mib * MiB)
            src.wait_actual(v.target_mib * MiB, timeout=300)
        _quiet(src)
        before = src.host_ram_bytes()
        _progress(f"{v.name}: source holds {before >> 20} MiB; migrating")
        uri = f"unix:{dst.workdir}/migration.sock"
        proc: subprocess.Popen[str] | None = None
        if v.balloon == "vballoon":
            proc = subprocess.Popen(
                migrate_command(src, dst, uri, v.trim),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        else:
            dst.qmp.cmd_raw("migrate-incoming", {"uri": uri})
            src.qmp.cmd_raw("migrate", {"uri": uri})
        t0 = time.monotonic()
        peak, sent_over_time = before, []
        started: float | None = None
        info: dict[str, Any] = {}
        while time.monotonic() - t0 < 600:
            got = src.qmp.cmd_raw("query-migrate").get("return", {})
            peak = max(peak, src.host_ram_bytes())
            if got.get("ram"):
                # Time from the migration's first report (vballoon's unplug comes before).
                started = started if started is not None else time.monotonic()
                sent = got["ram"]["transferred"]
                sent_over_time.append((round(time.monotonic() - started, 2), sent))
            if got.get("status") in ("completed", "failed", "cancelled"):
                info = got
                break
            time.sleep(0.1)
        trim: dict[str, Any] | None = None
        if proc is not None:
            out, err = proc.communicate(timeout=300)
            if proc.returncode:
                raise TrialError(f"{v.name}: vballoon migrate failed: {err.strip()}")
            trim = json.loads(out).get("trim")
        if info.get("status") != "completed":
            raise TrialError(f"{v.name}: the migration ended {info.get('status')!r}: {info}")
        dest_after = dst.host_ram_bytes()
        time.sleep(AFTER_S)
        dest_later = dst.host_ram_bytes()
        dst.attach_agent(60)
        got_sum = _checksum(dst)
        ram = info["ram"]
        row: dict[str, Any] = {
            "variant": v.name,
            "what": v.what,
            "bytes_sent": ram["transferred"],
            "normal_bytes": ram["normal-bytes"],
            "zero_pages": ram["duplicate"],
            "total_time_ms": info.get("total-time"),
            "downtime_ms": info.get("downtime"),
            "source_before_mib": before >> 20,
            "source_peak_mib": peak >> 20,
            "dest_after_mib": dest_after >> 20,
            "dest_30s_mib": dest_later >> 20,
            "checksum_ok": got_sum == checksum,
            "balloon_after": _balloon_state(dst, v),
            # the pause the trim added, and what it gave back
            "trim_paused_ms": trim["paused-ms"] if trim else None,
            "trim_mib": trim["bytes"] >> 20 if trim else None,
            "sent_over_time": sent_over_time,
        }
        _progress(
            f"{v.name}: {ram['transferred'] >> 20} MiB sent in {info.get('total-time')} ms, "
            f"downtime {info.get('downtime')} ms, source peak {peak >> 20} MiB, destination "
            f"{dest_after >> 20} -> {dest_later >> 20} MiB, checksum "
            f"{'ok' if row['checksum_ok'] else got_sum}"
        )
        return row


def _balloon_state(dst: VM, v: Variant) -> str:
    if v.balloon == "none":
        return "none"
    if v.balloon == "qemu":
        actual = int(dst._ctl("query-balloon")["return"]["actual"])
        return f"QEMU's balloon, guest at {actual >> 20} MiB"
    info = dst.vballoon_info()
    return (
        f"vballoon {'bound' if info['driver-ok'] else 'NOT bound'}, guest at "
        f"{int(dst.actual()) >> 20} MiB"
    )


def run_trial(env: TestEnv, only: Callable[[str], bool] = lambda _: True) -> dict[str, Any]:
    image = None
    if any(v.range_reports and only(v.name) for v in VARIANTS):
        image = str(initramfs_with_module(env, build_module(env)))
    rows = [run_variant(env, v, image) for v in VARIANTS if only(v.name)]
    by = {r["variant"]: r for r in rows}
    out: dict[str, Any] = {"rows": rows, "not_possible": NOT_POSSIBLE}

    def ratio(a: str, b: str, key: str = "bytes_sent") -> float | None:
        if a in by and b in by and by[b][key]:
            return round(float(by[a][key]) / float(by[b][key]), 3)
        return None

    out["reporting_bytes_vs_none"] = ratio("vballoon-reporting", "none")
    out["vballoon_vs_qemu_reporting_bytes"] = ratio("vballoon-reporting", "qemu-reporting")
    out["checksums_ok"] = int(all(r["checksum_ok"] for r in rows))

    def resident(name: str) -> float | None:
        r = by.get(name)
        return round(r["dest_30s_mib"] / r["source_before_mib"], 3) if r else None

    # With the trim where it ran (the aim); the untrimmed figure beside it.
    out["dest_resident_vs_source"] = resident("vballoon-reporting-trim") or resident(
        "vballoon-reporting"
    )
    out["dest_resident_vs_source_untrimmed"] = resident("vballoon-reporting")
    t = by.get("vballoon-reporting-trim")
    out["trim_paused_ms"] = t["trim_paused_ms"] if t else None
    out["goals"] = {
        "reporting_bytes_vs_none": "<= 0.3",
        "vballoon_vs_qemu_reporting_bytes": "<= 1.05",
        "checksums_ok": "= 1",
        "dest_resident_vs_source": "reported (aim <= 1.1 with the destination trim)",
    }
    out["guest"] = {
        "mem_mib": GUEST_MIB,
        "hold_mib": HOLD_MIB,
        "accel": env.accel,
        "qemu": env.qemu_version,
        "kernel": env.kernel_version,
    }
    out["machine"] = machine()
    out["median_downtime_ms"] = statistics.median(r["downtime_ms"] or 0 for r in rows)
    return out


def format_trial(result: dict[str, Any]) -> str:
    g, m = result["guest"], result["machine"]
    lines = [
        f"vballoon trial migrate: {g['mem_mib']} MiB guest ({g['accel']}, QEMU {g['qemu']}), "
        f"holding {g['hold_mib']} MiB, the rest written and freed; migration over a Unix socket",
        f"measured on {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}",
        f"{'variant':24} {'sent MiB':>9} {'zero pg':>8} {'total ms':>9} {'down ms':>8} "
        f"{'src MiB':>8} {'peak':>6} {'dst MiB':>8} {'+30 s':>6}  checksum  balloon after",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['variant']:24} {r['bytes_sent'] / MiB:9.1f} {r['zero_pages']:8d} "
            f"{r['total_time_ms']:9d} {r['downtime_ms']:8d} {r['source_before_mib']:8d} "
            f"{r['source_peak_mib']:6d} {r['dest_after_mib']:8d} {r['dest_30s_mib']:6d}  "
            f"{'ok' if r['checksum_ok'] else 'BAD':8}  {r['balloon_after']}"
        )
    for name, why in result["not_possible"].items():
        lines.append(f"{name:24} not measured: {why}")
    for key, goal in result["goals"].items():
        lines.append(f"{key} = {result[key]} (goal {goal})")
    if result.get("trim_paused_ms") is not None:
        lines.append(
            f"destination trim: paused {result['trim_paused_ms']} ms (downtime it adds); "
            f"without it dest_resident_vs_source = {result['dest_resident_vs_source_untrimmed']}"
        )
    return "\n".join(lines)


def write_plot(result: dict[str, Any], path: Path) -> str:
    """The PNG of bytes sent over time; a line saying where it is, or how to get it."""
    g, m = result["guest"], result["machine"]
    title = (
        f"vballoon trial migrate: {g['mem_mib']} MiB guest, {g['accel']}, QEMU {g['qemu']}, "
        f"{m['cpu']} ({m['cores']} cores)"
    )
    done = plot_bytes_sent(result["rows"], title, path)
    return f"plot: {done}" if done else f"plot: skipped; {HOW_TO_GET}"


def main(argv: list[str] | None = None) -> int:
    """``python -m vm_harness.trial_migrate [--json] [--variant NAME ...]``"""
    import argparse

    from vm_harness.testenv import ensure_testenv

    p = argparse.ArgumentParser(prog="vballoon trial migrate")
    p.add_argument("--json", action="store_true")
    p.add_argument("--variant", action="append", choices=[v.name for v in VARIANTS])
    args = p.parse_args(argv)
    env = ensure_testenv()
    chosen = set(args.variant or [v.name for v in VARIANTS])
    result = run_trial(env, lambda n: n in chosen)
    print(json.dumps(result, indent=2) if args.json else format_trial(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
