"""``vballoon bench soak``: does the process grow when it runs for long?

``vballoon serve`` runs as a child while our vhost-user frontend connects and
disconnects ``connects`` times, doing ``cycles`` inflate/deflate cycles in all (a 1 MiB
inflate buffer, then its deflate), and ``sessions`` control-socket sessions (QMP
greeting, negotiation, ``query-vballoon``, ``query-balloon-stats``) come and go. The
child's resident memory (VmRSS), open fds and memory mappings are read after the first
tenth of the work (warm: caches filled, first allocations made) and at the end; the
growth between the two is the result:

``rss_growth_kib`` (goal <= 4096), ``fd_growth`` (goal <= 0), ``maps_growth`` (goal <= 0).
"""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
import time
from typing import Any

from qemu.qmp import QMPClient

from vballoon.bench import FIRST_FRAME, BenchError, machine
from vballoon.bench_rig import Frontend, GuestMemfds, RigError, ServeChild
from vballoon.units import MiB

#: The goals, as the interface names them.
GOALS = {"rss_growth_kib": 4096, "fd_growth": 0, "maps_growth": 0}
#: Guest RAM the frontend shares.
GUEST_BYTES = 64 * MiB


def process_usage(pid: int) -> dict[str, int]:
    """Resident KiB, open fds and memory mappings of process ``pid``."""
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    with open(f"/proc/{pid}/maps") as f:
        maps = sum(1 for _ in f)
    return {"rss_kib": rss, "fds": len(os.listdir(f"/proc/{pid}/fd")), "maps": maps}


def settled_usage(pid: int) -> dict[str, int]:
    """:func:`process_usage` once the child finished tearing its last connection down:
    two samples 50 ms apart that agree on fds and mappings (at most 2 s)."""
    last = process_usage(pid)
    for _ in range(40):
        time.sleep(0.05)
        now = process_usage(pid)
        if (now["fds"], now["maps"]) == (last["fds"], last["maps"]):
            return now
        last = now
    return last


async def _control_sessions(path: str, n: int) -> None:
    for _ in range(n):
        client = QMPClient("vballoon-soak")
        await client.connect(path)
        await client.execute("query-vballoon")
        await client.execute("query-balloon-stats")
        await client.disconnect()


def _tenth(
    child: ServeChild,
    guest: GuestMemfds,
    rnd: random.Random,
    cycles: int,
    connects: int,
    sessions: int,
) -> None:
    """One tenth of the work: ``connects`` connections sharing ``cycles`` cycles."""
    frames = GUEST_BYTES // 4096
    per = [cycles // connects + (1 if i < cycles % connects else 0) for i in range(connects)]
    for n in per:
        fe = Frontend(child.sock, guest, queues=2)
        try:
            for _ in range(n):
                start = rnd.randrange(FIRST_FRAME, frames - 256)
                pfns = list(range(start, start + 256))
                fe.post_pfns(0, pfns)  # inflate
                fe.post_pfns(1, pfns)  # deflate
        finally:
            fe.close()
    asyncio.run(_control_sessions(child.control, sessions))


def run_soak(cycles: int = 10_000, connects: int = 1_000, sessions: int = 1_000) -> dict[str, Any]:
    """Run the soak; the JSON-able result (growth keys, goals, counts, machine).

    :raise BenchError: if the child or a connection fails.
    """
    if min(cycles, connects, sessions) < 10 or connects > cycles:
        raise BenchError("cycles, connects and sessions must be at least 10, connects <= cycles")
    rnd = random.Random(1)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vballoon-soak-") as tmp:
        try:
            child = ServeChild(tmp)
        except RigError as err:
            raise BenchError(str(err)) from None
        guest = GuestMemfds(GUEST_BYTES)
        try:
            os.posix_fallocate(guest.fd, 0, GUEST_BYTES)
            start: dict[str, int] = {}
            for tenth in range(10):
                _tenth(child, guest, rnd, cycles // 10, connects // 10, sessions // 10)
                if tenth == 0:
                    start = settled_usage(child.pid)
            end = settled_usage(child.pid)
        except (RigError, OSError) as err:
            raise BenchError(f"soak failed: {err}") from err
        finally:
            child.close()
            guest.close()
    growth = {
        "rss_growth_kib": end["rss_kib"] - start["rss_kib"],
        "fd_growth": end["fds"] - start["fds"],
        "maps_growth": end["maps"] - start["maps"],
    }
    return {
        **growth,
        "goals": {k: f"<= {v}" for k, v in GOALS.items()},
        "met": all(growth[k] <= v for k, v in GOALS.items()),
        "after_first_tenth": start,
        "at_end": end,
        "work": {"cycles": cycles, "connects": connects, "sessions": sessions},
        "seconds": round(time.monotonic() - t0, 1),
        "machine": machine(),
    }


def format_soak(result: dict[str, Any]) -> str:
    m, w = result["machine"], result["work"]
    lines = [
        f"vballoon bench soak: {w['cycles']} inflate/deflate cycles over {w['connects']} "
        f"frontend connections, {w['sessions']} control sessions, {result['seconds']} s",
        f"  measured on {m['cpu']}, {m['cores']} cores, Linux {m['kernel']} (no VM)",
        "  growth of the vballoon serve process from the first tenth of the work to the end:",
    ]
    for key, goal in GOALS.items():
        mark = "ok" if result[key] <= goal else "MISS"
        lines.append(f"  {key:16} {result[key]:>8}  (goal <= {goal}) {mark}")
    return "\n".join(lines)
