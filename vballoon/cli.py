"""The ``vballoon`` command line.

Subcommands:
  bench discard   the device's data path against raw kernel syscalls
  demo            an in-process guest balloons and reports memory; shows it coming back
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from device.errors import BalloonError

SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``512M``, ``1G``, ``4096`` -> bytes (binary units; a trailing B/iB is allowed)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in SIZE_SUFFIXES else ""
    number = t[: len(t) - len(unit)]
    try:
        value = float(number) * SIZE_SUFFIXES[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 512M or 1G)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"size must not be negative: {text!r}")
    return int(value)


def _cmd_bench_discard(args: argparse.Namespace) -> int:
    from vballoon.bench import BenchError, format_table, run_discard_bench

    try:
        result = run_discard_bench(size=args.size, repeat=args.repeat)
    except BenchError as err:
        print(f"vballoon bench discard: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from vballoon.demo import run_demo

    return run_demo(size=args.size)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vballoon",
        description="A virtio-balloon device that runs beside QEMU and gives guest memory "
        "back to the host (hole punching shared guest RAM, C data plane).",
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (default: warning)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    bench = sub.add_parser("bench", help="measure the data path against raw kernel syscalls")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    disc = bench_sub.add_parser(
        "discard",
        help="inflate and free-page reports through the real queue path vs raw punch-hole",
        description="Inflate 256-PFN buffers and 2 MiB free-page reports through the rings, "
        "the device and the C accelerator on a touched memfd, against raw fallocate "
        "punch-hole calls on the same ranges in the same process. Prints ratios "
        "(reference time / device time: above 1 the device is faster).",
    )
    disc.add_argument("--json", action="store_true", help="print one JSON object")
    disc.add_argument(
        "--size",
        type=parse_size,
        default=1 << 30,
        help="guest memory to discard per run (default 1G)",
    )
    disc.add_argument("--repeat", type=int, default=3, help="runs per scenario, median (default 3)")
    disc.set_defaults(func=_cmd_bench_discard)

    demo = sub.add_parser(
        "demo",
        help="balloon, report and range-report a memfd guest in-process; show memory returned",
    )
    demo.add_argument(
        "--size", type=parse_size, default=512 << 20, help="guest memory size (default 512M)"
    )
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except BalloonError as err:
        print(f"vballoon: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
