#!/usr/bin/env python3
"""The range-report study: PFN_LEN vs PFN_ORDER vs BITMAP on fresh and fragmented guests.

For each guest kernel setting (init_on_alloc=1, Debian's default, and
init_on_alloc=0), each guest state (fresh; fragmented: ``memhog frag`` leaves
half of 640 MiB free as single 4 KiB pages between used ones), each encoding
and minimum order 0 and 9, it makes the guest's free memory resident on the
host, runs one pass of the guest module and measures:

- report bytes, notifications, guest ns and device ns, each per GiB reported;
- host memory returned (the guest RAM file's allocated bytes before/after);
- wall time of the pass seen from the host.

The same guest states go through the standard free page reporting of
``virtio_balloon`` too (order >= 9 blocks, 2 s after frees, 32 entries a
report): it is measured from the free until the host stops getting memory
back. Prints one table (markdown); ``--json FILE`` keeps the raw numbers.

Usage: python3 scripts/range_report_study.py [--json FILE] [--mem MIB]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vm_harness.guest_module import ReportModule, build_module, initramfs_with_module
from vm_harness.testenv import ensure_testenv
from vm_harness.vm import VM, VMOptions

MiB, GiB = 1 << 20, 1 << 30
ENCODINGS = ("pfn_len", "pfn_order", "bitmap")
ORDERS = (0, 9)
FRAG_MIB = 640


def counters(vm: VM) -> dict[str, int]:
    return vm.vballoon_info()["counters"]


def resident(vm: VM) -> None:
    free = vm.meminfo()["MemFree"] // MiB
    vm.run(f"memhog touch {max(free - 128, 16)}", timeout=600)


def prepare(vm: VM, state: str) -> None:
    if state == "fragmented":
        out = vm.run(f"memhog frag {FRAG_MIB}", timeout=600)
        assert "fragmented" in out, out


def module_rows(env, initramfs: Path, state: str, init_on_alloc: int, mem: int) -> list[dict]:
    rows = []
    opts = VMOptions(
        balloon="vballoon",
        load_balloon=False,
        initramfs=str(initramfs),
        mem_mib=mem,
        append=f"init_on_alloc={init_on_alloc}",
    )
    with VM(env, opts) as vm:
        mod = ReportModule(vm)
        mod.load()
        prepare(vm, state)
        for enc in ENCODINGS:
            for order in ORDERS:
                resident(vm)
                mod.set(encoding=enc, min_order=order, budget_mb=0, budget_pct=90)
                before, c0, t0 = vm.host_ram_bytes(), counters(vm), time.monotonic()
                lp = mod.run_pass(timeout=600)
                wall = time.monotonic() - t0
                after, c1 = vm.host_ram_bytes(), counters(vm)
                gib = lp["frames"] * 4096 / GiB
                rows.append(
                    {
                        "init_on_alloc": init_on_alloc,
                        "state": state,
                        "path": enc,
                        "min_order": order,
                        "reported_mib": lp["frames"] * 4096 / MiB,
                        "records": lp["records"],
                        "report_bytes_per_gib": lp["report_bytes"] / gib if gib else None,
                        "notifications_per_gib": lp["notifications"] / gib if gib else None,
                        "guest_ms_per_gib": lp["ns"] / 1e6 / gib if gib else None,
                        "device_ms_per_gib": (c1["discard-ns"] - c0["discard-ns"]) / 1e6 / gib
                        if gib
                        else None,
                        "returned_mib": (before - after) / MiB,
                        "wall_s": wall,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


def standard_row(env, state: str, init_on_alloc: int, mem: int) -> dict:
    """virtio_balloon's free page reporting after the guest frees its touched memory."""
    opts = VMOptions(balloon="vballoon", mem_mib=mem, append=f"init_on_alloc={init_on_alloc}")
    with VM(env, opts) as vm:
        prepare(vm, state)
        time.sleep(4)  # let reporting of boot-time frees finish
        free = vm.meminfo()["MemFree"] // MiB
        c0 = counters(vm)
        vm.run(f"memhog touch {max(free - 128, 16)}", timeout=600)
        peak, t0 = vm.host_ram_bytes(), time.monotonic()
        last, since = peak, time.monotonic()
        while time.monotonic() - since < 5 and time.monotonic() - t0 < 60:
            time.sleep(0.2)
            now = vm.host_ram_bytes()
            if now < last - 2 * MiB:
                last, since = now, time.monotonic()
        c1 = counters(vm)
        reported = c1["reported-bytes"] - c0["reported-bytes"]
        gib = reported / GiB
        row = {
            "init_on_alloc": init_on_alloc,
            "state": state,
            "path": "virtio_balloon reporting",
            "min_order": 9,
            "reported_mib": reported / MiB,
            "records": c1["report-entries"] - c0["report-entries"],
            "report_bytes_per_gib": 16 * (c1["report-entries"] - c0["report-entries"]) / gib
            if gib
            else None,
            "notifications_per_gib": (c1["reports"] - c0["reports"]) / gib if gib else None,
            "guest_ms_per_gib": None,
            "device_ms_per_gib": (c1["discard-ns"] - c0["discard-ns"]) / 1e6 / gib if gib else None,
            "returned_mib": (peak - last) / MiB,
            "wall_s": since - t0,
        }
        print(json.dumps(row), flush=True)
        return row


def fmt(v: object, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def table(rows: list[dict]) -> str:
    head = (
        "| init_on_alloc | guest | path | min order | reported MiB | report bytes/GiB | "
        "notifications/GiB | guest ms/GiB | device ms/GiB | returned MiB | wall s |"
    )
    out = [head, "|" + "---|" * 11]
    for r in rows:
        out.append(
            f"| {r['init_on_alloc']} | {r['state']} | {r['path']} | {r['min_order']} | "
            f"{fmt(r['reported_mib'], 0)} | {fmt(r['report_bytes_per_gib'], 0)} | "
            f"{fmt(r['notifications_per_gib'])} | {fmt(r['guest_ms_per_gib'], 0)} | "
            f"{fmt(r['device_ms_per_gib'], 1)} | {fmt(r['returned_mib'], 0)} | "
            f"{fmt(r['wall_s'], 2)} |"
        )
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the raw rows here")
    ap.add_argument("--mem", type=int, default=1024, help="guest MiB (default 1024)")
    args = ap.parse_args()
    env = ensure_testenv()
    initramfs = initramfs_with_module(env, build_module(env))
    rows: list[dict] = []
    for ioa in (1, 0):
        for state in ("fresh", "fragmented"):
            rows += module_rows(env, initramfs, state, ioa, args.mem)
            rows.append(standard_row(env, state, ioa, args.mem))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
