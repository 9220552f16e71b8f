"""``vballoon ctl``: talk to a running vballoon's control socket with ``qemu.qmp``.

Actions: ``target SIZE`` (ask the guest to be SIZE bytes of RAM, K/M/G
suffixes), ``stats`` (the guest's latest memory statistics) and ``info``
(features, queues, sizes, counters). Output is for people unless ``--json``
asks for the command's raw return value. Every failure ends as one line on
stderr and a non-zero exit status: 1 when the socket or the command failed,
2 when the command line itself was wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, QMPError

from vballoon.units import SizeError, format_bytes, parse_size

ACTIONS = ("target", "stats", "info")

#: Seconds a whole ``ctl`` call may take (connect, negotiate, commands).
DEFAULT_TIMEOUT = 10.0

#: Guest statistics reported in bytes by Linux; the others are counts.
BYTE_STATS = frozenset(
    {
        "stat-swap-in",
        "stat-swap-out",
        "stat-free-memory",
        "stat-total-memory",
        "stat-available-memory",
        "stat-disk-caches",
    }
)


class CtlError(Exception):
    """A ``ctl`` action failed; the message is the one line the user sees."""


class UsageError(CtlError):
    """The action or its argument is wrong (exit status 2, as argparse)."""


def _connect_problem(path: str, exc: BaseException) -> str:
    """Say in words why connecting to ``path`` failed, and what to check."""
    if isinstance(exc, FileNotFoundError):
        return f"no control socket at {path} (is vballoon serve running?)"
    if isinstance(exc, ConnectionRefusedError):
        return f"nobody is listening on {path} (stale socket or not a socket; is vballoon running?)"
    if isinstance(exc, PermissionError):
        return f"permission denied on {path} (the socket belongs to the user running vballoon)"
    if isinstance(exc, EOFError):
        return f"{path} hung up before the QMP greeting (not a vballoon control socket?)"
    return f"cannot talk to {path}: {exc}"


@contextlib.asynccontextmanager
async def connect(path: str) -> AsyncIterator[QMPClient]:
    """A negotiated QMP session on ``path``, disconnected on exit.

    :raise CtlError: if nobody listens there or it does not speak QMP.
    """
    client = QMPClient("vballoon-ctl")
    try:
        await client.connect(path)
    except ConnectError as err:
        raise CtlError(_connect_problem(path, err.exc)) from err
    try:
        yield client
    finally:
        # disconnect() re-raises whatever broke the session; that was reported already.
        with contextlib.suppress(QMPError, OSError, EOFError):
            await client.disconnect()


async def execute(
    client: QMPClient, command: str, arguments: Mapping[str, object] | None = None
) -> Any:
    """Run one command and return its value.

    :raise CtlError: with the server's ``desc`` if the command failed.
    """
    try:
        return await client.execute(command, arguments)
    except ExecuteError as err:
        raise CtlError(f"{command}: {err}") from err
    except ExecInterruptedError as err:
        raise CtlError(f"{command}: the control socket closed the connection") from err


async def set_target(path: str, size: int) -> dict[str, int]:
    """Ask the guest to be ``size`` bytes of RAM; return the target and the size now."""
    async with connect(path) as client:
        await execute(client, "balloon", {"value": size})
        now = await execute(client, "query-balloon")
    return {"target": size, "actual": int(now["actual"])}


async def get_stats(path: str) -> dict[str, Any]:
    """The guest's latest statistics (``query-balloon-stats``)."""
    async with connect(path) as client:
        return dict(await execute(client, "query-balloon-stats"))


async def get_info(path: str) -> dict[str, Any]:
    """The device's state and counters (``query-vballoon``)."""
    async with connect(path) as client:
        return dict(await execute(client, "query-vballoon"))


# -- output ---------------------------------------------------------------------


def _size_or_unknown(n: int | None) -> str:
    return "unknown (no memory table yet)" if n is None else format_bytes(n)


def format_target(result: Mapping[str, Any]) -> str:
    return (
        f"target set: guest RAM {format_bytes(result['target'])} "
        f"(the guest has {format_bytes(result['actual'])} now)"
    )


def format_stats(result: Mapping[str, Any]) -> str:
    stats: Mapping[str, int] = result["stats"]
    if not result["last-update"]:
        head = "no statistics from the guest yet"
    else:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(result["last-update"]))
        head = f"guest statistics from {when} ({result['age-seconds']:.1f} s ago)"
    lines = [head]
    for name, value in stats.items():
        if value < 0:
            shown = "-"
        elif name in BYTE_STATS:
            shown = format_bytes(value)
        else:
            shown = str(value)
        lines.append(f"  {name.removeprefix('stat-'):<20} {shown}")
    return "\n".join(lines)


def format_info(info: Mapping[str, Any]) -> str:
    f = info["features"]
    hint = info["free-page-hint"]
    rows = [
        ("features offered", f"{f['offered']} {', '.join(f['offered-names'])}"),
        ("features negotiated", f"{f['negotiated']} {', '.join(f['negotiated-names'])}"),
        ("driver ok", "yes" if info["driver-ok"] else "no"),
        ("queues", " ".join(f"{name}={i}" for name, i in info["queues"].items())),
        ("broken queues", " ".join(map(str, info["broken-queues"])) or "none"),
        ("guest RAM", _size_or_unknown(info["ram-size"])),
        ("target", f"{_size_or_unknown(info['target'])} (num_pages {info['num-pages']})"),
        ("actual", f"{_size_or_unknown(info['actual'])} (actual {info['actual-pages']} pages)"),
        (
            "ballooned",
            f"{format_bytes(info['ballooned-bytes'])} (the guest's account; "
            f"{format_bytes(info['tracked-bytes'])} recorded by the device since it started)",
        ),
        ("poison value", f"{info['poison-val']:#x}"),
        (
            "free page hints",
            f"{hint['state']} (cmd id {hint['cmd-id']:#x}, {hint['hinted-frames']} frames)",
        ),
    ]
    lines = [f"{k + ':':<21}{v}" for k, v in rows]
    lines.append("counters:")
    lines += [f"  {k:<22}{v}" for k, v in info["counters"].items()]
    return "\n".join(lines)


# -- entry point ------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_qmp_logs() -> Iterator[None]:
    """qemu.qmp logs its failures at ERROR; ours already say it in one line."""
    logger = logging.getLogger("qemu.qmp")
    if logger.isEnabledFor(logging.DEBUG):
        yield
        return
    old = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(old)


def _parse_size(text: str) -> int:
    try:
        return parse_size(text)
    except SizeError as err:
        raise UsageError(str(err)) from err


async def _run(control_path: str, action: str, arg: str | None, json_output: bool) -> str:
    result: Mapping[str, Any]
    text: Callable[[Mapping[str, Any]], str]
    if action == "target":
        if arg is None:
            raise UsageError("target needs a SIZE (for example 512M or 2G)")
        result, text = await set_target(control_path, _parse_size(arg)), format_target
    elif action == "stats" or action == "info":
        if arg is not None:
            raise UsageError(f"{action} takes no argument, got {arg!r}")
        if action == "stats":
            result, text = await get_stats(control_path), format_stats
        else:
            result, text = await get_info(control_path), format_info
    else:
        raise UsageError(f"unknown action {action!r} (one of: {', '.join(ACTIONS)})")
    return json.dumps(result, indent=2) if json_output else text(result)


def run_ctl(
    control_path: str,
    action: str,
    arg: str | None = None,
    *,
    json_output: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> int:
    """Run one ``ctl`` action; print its result, or one line on stderr.

    :param control_path: the control socket of a running vballoon
    :param action: ``target``, ``stats`` or ``info``
    :param arg: the SIZE for ``target`` (``512M``, ``2G``, bytes)
    :param json_output: print the raw QMP return value as JSON
    :param timeout: seconds the whole action may take
    :return: exit status: 0 done, 1 the socket or command failed, 2 bad usage
    """

    async def bounded() -> str:
        async with asyncio.timeout(timeout):
            return await _run(control_path, action, arg, json_output)

    try:
        with _quiet_qmp_logs():
            out = asyncio.run(bounded())
    except UsageError as err:
        print(f"vballoon ctl: {err}", file=sys.stderr)
        return 2
    except CtlError as err:
        print(f"vballoon ctl: {err}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"vballoon ctl: no answer from {control_path} within {timeout:g} s", file=sys.stderr)
        return 1
    except (QMPError, OSError) as err:  # whatever else broke the session
        print(f"vballoon ctl: {control_path}: {err}", file=sys.stderr)
        return 1
    print(out)
    return 0
