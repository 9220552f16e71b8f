"""The ``vballoon`` command line.

Subcommands:
  serve           the device process QEMU attaches over vhost-user or vfio-user
  ctl             talk to a running ``serve`` through its control socket
  bench discard   the device's data path against raw kernel syscalls
  bench vhost-user, bench vfio-user
                  inflate through serve's socket against the same work in process
  bench vm        the same guest with vballoon and with QEMU's own balloon
  migrate         live-migrate a VM with its vhost-user balloon (unplug, migrate, plug)
  trial migrate   what a balloon buys a live migration, variant by variant
  demo            an in-process guest balloons and reports memory; shows it coming back
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from device.errors import BalloonError
from device.runner import DEFAULT_POLL_LIMIT_US
from vballoon.units import SizeError, parse_size


def gpa_range_arg(text: str) -> tuple[int, int]:
    """argparse type for ``GPA+SIZE`` (``0x7f000000+16M``): a guest-physical range."""
    start, sep, size = text.partition("+")
    try:
        gpa = int(start, 0) if start.lower().startswith("0x") else parse_size(start)
        length = parse_size(size) if sep else 0
    except (ValueError, SizeError):
        raise argparse.ArgumentTypeError(
            f"not a range: {text!r} (GPA+SIZE, e.g. 0x7f000000+16M)"
        ) from None
    if gpa < 0 or length <= 0 or gpa + length > 1 << 64:
        raise argparse.ArgumentTypeError(f"not a range of guest-physical memory: {text!r}")
    return gpa, length


def size_arg(text: str) -> int:
    """argparse type for sizes (``512M``, ``1G``)."""
    try:
        return parse_size(text)
    except SizeError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


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


#: Longest adaptive polling window of ``serve`` after work (see --busy-poll-us).
DEFAULT_BUSY_POLL_US = DEFAULT_POLL_LIMIT_US
#: How long ``bench vhost-user``'s frontend (``bench vfio-user``'s driver) polls for a buffer
#: before it sleeps.
DEFAULT_FRONTEND_POLL_US = DEFAULT_POLL_LIMIT_US

#: ``--no-X`` switches of ``serve``: (option, BalloonConfig field, what it turns off)
FEATURE_SWITCHES = [
    ("stats", "stats", "the statistics queue (STATS_VQ)"),
    ("reporting", "reporting", "free page reporting (REPORTING)"),
    ("free-page-hint", "free_page_hint", "free page hinting (FREE_PAGE_HINT)"),
    ("deflate-on-oom", "deflate_on_oom", "DEFLATE_ON_OOM"),
    ("page-poison", "page_poison", "PAGE_POISON"),
    ("must-tell-host", "must_tell_host", "MUST_TELL_HOST"),
    ("range-report", "range_report", "vballoon's range-report queue (experimental)"),
    ("event-idx", "event_idx", "VIRTIO_RING_F_EVENT_IDX"),
    ("indirect-desc", "indirect_desc", "VIRTIO_RING_F_INDIRECT_DESC"),
]


def _cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from device import BalloonConfig
    from vballoon.serve import ServeOptions, StartupError, serve

    if args.stats_interval < 0:
        print("vballoon serve: --stats-interval must be >= 0", file=sys.stderr)
        return 2
    config = BalloonConfig(stats_interval=args.stats_interval)
    config.reserved_gpa = (*config.reserved_gpa, *args.reserved)
    for _, fld, _ in FEATURE_SWITCHES:
        setattr(config, fld, not getattr(args, f"no_{fld}"))
    if args.busy_poll_us < 0:
        print("vballoon serve: --busy-poll-us must be >= 0", file=sys.stderr)
        return 2
    if args.client and args.vfio_user:
        print("vballoon serve: --client is for --socket (vhost-user) only", file=sys.stderr)
        return 2
    if args.qemu_qmp and not args.vfio_user:
        # QEMU itself refuses to migrate with vhost-user-test-device (unmigratable).
        print("vballoon serve: --qemu-qmp is for --vfio-user only", file=sys.stderr)
        return 2
    opts = ServeOptions(
        socket=args.vfio_user or args.socket,
        control=args.control,
        transport="vfio-user" if args.vfio_user else "vhost-user",
        client=args.client,
        qemu_qmp=args.qemu_qmp,
        busy_poll_us=args.busy_poll_us,
        config=config,
    )
    try:
        return asyncio.run(serve(opts))
    except StartupError as err:
        print(f"vballoon serve: {err}", file=sys.stderr)
        return 1


def _cmd_ctl(args: argparse.Namespace) -> int:
    from vballoon.ctl import run_ctl

    return run_ctl(args.control, args.action, args.size, json_output=args.json)


def _cmd_bench_transport(args: argparse.Namespace) -> int:
    from vballoon.bench import BenchError, run_transport_bench

    transport = args.bench  # "vhost-user" or "vfio-user"
    key = transport.replace("-", "_")
    try:
        result = run_transport_bench(
            transport,
            size=args.size,
            repeat=args.repeat,
            busy_poll_us=args.busy_poll_us,
            driver_poll_us=args.driver_poll_us,
        )
    except BenchError as err:
        print(f"vballoon bench {transport}: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    s, m, sp = result["seconds"], result["machine"], result["spread"]
    ratio, goal = result[f"{key}_vs_inprocess"], result["goal"]
    driver = "frontend" if transport == "vhost-user" else "driver"
    wire = (
        "socket, kick/call eventfds, rings, child"
        if transport == "vhost-user"
        else "socket, posted notify writes, MSI-X eventfd, rings, child"
    )
    print(
        f"vballoon bench {transport}: {args.size >> 20} MiB inflated as 256-PFN buffers, "
        f"{args.repeat} runs, medians"
    )
    print(f"  measured on {m['cpu']}, {m['cores']} cores, Linux {m['kernel']} (no VM)")
    print(
        f"  polling: serve up to {result['busy_poll_us']} us (adaptive), "
        f"{driver} {args.driver_poll_us} us (as a KVM vCPU halt-polls)"
    )
    print(f"  {transport} ({wire}): {s[key]:.3f} s")
    print(f"  in-process (same rings and device): {s['inprocess']:.3f} s")
    print(
        f"  {key}_vs_inprocess = {ratio:.2f} (runs {sp['min']:.2f}-{sp['max']:.2f}; "
        f"goal >= {goal}: {'met' if ratio >= goal else 'MISSED'})"
    )
    return 0


def _cmd_bench_soak(args: argparse.Namespace) -> int:
    from vballoon.bench import BenchError
    from vballoon.bench_soak import format_soak, run_soak

    try:
        result = run_soak(cycles=args.cycles, connects=args.connects, sessions=args.sessions)
    except BenchError as err:
        print(f"vballoon bench soak: {err}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else format_soak(result))
    return 0 if result["met"] else 1


def _cmd_bench_vm(args: argparse.Namespace) -> int:
    from vm_harness.bench_vm import format_vm_table, run_vm_bench
    from vm_harness.testenv import ProvisionError, ensure_testenv
    from vm_harness.vm import VMError

    try:
        env = ensure_testenv()
        result = run_vm_bench(
            env,
            runs=args.runs,
            mem_mib=args.mem >> 20,
            target_mib=args.target >> 20,
            transport=args.transport,
        )
    except (ProvisionError, VMError) as err:
        print(f"vballoon bench vm: {err}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else format_vm_table(result))
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    import asyncio

    from vballoon.migrate import MigrateError, MigrateOptions, migrate

    opts = MigrateOptions(
        source_qmp=args.source_qmp,
        dest_qmp=args.dest_qmp,
        source_control=args.source_control,
        dest_control=args.dest_control,
        dest_socket=args.dest_socket,
        uri=args.uri,
        device_id=args.device_id,
        trim=args.trim,
        unplug_timeout=args.timeout,
        migrate_timeout=args.migrate_timeout,
        replug_timeout=args.timeout,
    )
    try:
        result = asyncio.run(migrate(opts))
    except MigrateError as err:
        print(f"vballoon migrate: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def _cmd_trial_migrate(args: argparse.Namespace) -> int:
    from vm_harness.testenv import ProvisionError, ensure_testenv
    from vm_harness.trial_migrate import VARIANTS, TrialError, format_trial, run_trial, write_plot
    from vm_harness.vm import VMError

    chosen = set(args.variant or ())
    unknown = chosen - {v.name for v in VARIANTS}
    if unknown:
        names = ", ".join(v.name for v in VARIANTS)
        print(
            f"vballoon trial migrate: no variant {sorted(unknown)[0]!r} ({names})", file=sys.stderr
        )
        return 2
    try:
        env = ensure_testenv()
        result = run_trial(env, lambda name: not chosen or name in chosen)
    except (ProvisionError, VMError, TrialError) as err:
        print(f"vballoon trial migrate: {err}", file=sys.stderr)
        return 1
    plot_line = write_plot(result, Path(args.plot))
    if args.json:
        print(json.dumps(result, indent=2))
        print(plot_line, file=sys.stderr)
    else:
        print(format_trial(result))
        print(plot_line)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.in_process:
        from vballoon.demo import run_demo

        return run_demo(size=args.size or 512 << 20)
    from vm_harness.demo import run_vm_demo

    return run_vm_demo(mem_mib=(args.size or 1 << 30) >> 20)


def _memory_bench_args(
    p: argparse.ArgumentParser, size_help: str, repeat: int, repeat_help: str
) -> None:
    """--json, --size and --repeat, shared by the in-process benchmarks."""
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--size", type=size_arg, default=1 << 30, help=f"{size_help} (default 1G)")
    p.add_argument("--repeat", type=int, default=repeat, help=f"{repeat_help} (default {repeat})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vballoon",
        description="A virtio-balloon device that runs beside QEMU and gives guest memory "
        "back to the host (hole punching shared guest RAM, C data plane).",
    )
    levels = ["debug", "info", "warning", "error"]
    level_help = "log verbosity (default: info for serve, warning otherwise)"
    parser.add_argument("--log-level", default=None, choices=levels, help=level_help)
    # Also accepted after the subcommand (vballoon serve ... --log-level debug).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default=argparse.SUPPRESS, choices=levels, help=level_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        parents=[common],
        help="run the balloon device for QEMU (vhost-user or vfio-user)",
        description="Run the virtio-balloon device beside QEMU, with guest RAM from "
        "-object memory-backend-memfd,share=on (or a shared hugetlbfs file). "
        "Over vhost-user (--socket): QEMU attaches it with -chardev socket,id=bal,path=SOCKET "
        "-device vhost-user-test-device-pci,chardev=bal,virtio-id=5,num_vqs=6,vq_size=64,"
        "config_size=16. Over vfio-user (--vfio-user): vballoon is a whole virtio-pci "
        'function and QEMU attaches it with -device \'{"driver":"vfio-user-pci","socket":'
        '{"type":"unix","path":"SOCKET"}}\'. Targets and stats go through the control '
        "socket (QEMU's own balloon commands cannot reach an external device). QEMU 11.1 "
        "reconnects to neither: a backend restart means a VM restart. Give --qemu-qmp with "
        "vfio-user: QEMU would migrate the VM and leave the balloon dead on the other side.",
    )
    where = serve.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--socket",
        metavar="PATH",
        help="serve over vhost-user on this socket (created; QEMU connects to it)",
    )
    where.add_argument(
        "--vfio-user",
        metavar="PATH",
        help="serve a virtio-pci function over vfio-user on this socket (created; QEMU's "
        "vfio-user-pci connects to it)",
    )
    serve.add_argument(
        "--qemu-qmp",
        metavar="PATH",
        help="with --vfio-user: a QMP socket of QEMU's for vballoon alone (-qmp "
        "unix:PATH,server=on,wait=off). While QEMU's device is attached vballoon refuses "
        "every live migration there, with a log line saying why (QEMU 11.1 migrates a "
        "vfio-user device without its state); after device_del it lets them run",
    )
    serve.add_argument(
        "--client",
        action="store_true",
        help="with --socket: connect to PATH instead (QEMU's chardev in server mode)",
    )
    serve.add_argument(
        "--control",
        required=True,
        metavar="PATH",
        help="QMP-compatible control socket to create (mode 0600)",
    )
    serve.add_argument(
        "--reserved",
        type=gpa_range_arg,
        action="append",
        default=[],
        metavar="GPA+SIZE",
        help="guest-physical memory that is never the guest's to give, even where a memory "
        "region covers it: never discarded, nor any backing page holding it (repeatable). "
        "The PC's legacy window 0xA0000+384K always is. Name q35's TSEG (the top 1-16 MiB "
        "of RAM below 4 GiB, SMRAM) when guest RAM is on 1 GiB huge pages, whose rounding "
        "puts it in a page of RAM",
    )
    serve.add_argument(
        "--stats-interval",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds between guest statistics refreshes; 0: never (default 5)",
    )
    serve.add_argument(
        "--busy-poll-us",
        type=int,
        default=DEFAULT_BUSY_POLL_US,
        metavar="US",
        help="after work, a queue watches its ring for the driver's next buffer before it "
        "sleeps, for a window that grows while the driver's kicks come soon after and "
        "shrinks to nothing when they do not (like KVM's halt polling); this is the "
        "longest window in microseconds (saves a wake-up per buffer; 0: never poll; "
        f"default {DEFAULT_BUSY_POLL_US})",
    )
    for opt, fld, what in FEATURE_SWITCHES:
        serve.add_argument(
            f"--no-{opt}", dest=f"no_{fld}", action="store_true", help=f"do not offer {what}"
        )
    serve.set_defaults(func=_cmd_serve)

    ctl = sub.add_parser(
        "ctl",
        parents=[common],
        help="talk to a running vballoon serve (target, stats, info)",
        description="Drive a running vballoon serve through its QMP-compatible control "
        "socket (qemu.qmp and qmp-shell work on it too). Actions: 'target SIZE' sets the "
        "guest's memory size (like QEMU's balloon command; SIZE like 512M or 1G), 'stats' "
        "shows the guest's latest memory statistics, 'info' shows features, queues and "
        "counters.",
    )
    ctl.add_argument("--control", required=True, metavar="PATH", help="the control socket")
    ctl.add_argument("--json", action="store_true", help="print the raw QMP answer as JSON")
    ctl.add_argument("action", choices=["target", "stats", "info"], help="what to do")
    ctl.add_argument(
        "size",
        nargs="?",
        default=None,
        metavar="SIZE",
        help="with target: the guest memory size to aim for",
    )
    ctl.set_defaults(func=_cmd_ctl)

    bench = sub.add_parser(
        "bench", parents=[common], help="measure the data path against raw kernel syscalls"
    )
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    disc = bench_sub.add_parser(
        "discard",
        help="inflate and free-page reports through the real queue path vs raw punch-hole",
        description="Inflate 256-PFN buffers and 2 MiB free-page reports through the rings, "
        "the device and the C accelerator on a touched memfd, against raw fallocate "
        "punch-hole calls on the same ranges in the same process. Prints ratios "
        "(reference time / device time: above 1 the device is faster).",
    )
    _memory_bench_args(disc, "guest memory to discard per run", 3, "runs per scenario, median")
    disc.set_defaults(func=_cmd_bench_discard)

    for transport, wire in (
        ("vhost-user", "our vhost-user frontend with memfd guest memory, kick and call eventfds"),
        (
            "vfio-user",
            "our vfio-user client and virtio-pci driver (DMA maps of memfd guest memory, "
            "posted notify writes, an MSI-X eventfd)",
        ),
    ):
        key = transport.replace("-", "_")
        driver = "frontend" if transport == "vhost-user" else "driver"
        tb = bench_sub.add_parser(
            transport,
            help=f"inflate through vballoon serve over {transport} vs the in-process path",
            description=f"Start vballoon serve as a child, attach {wire}, and inflate 256-PFN "
            "buffers one at a time, waiting for each one's interrupt; compare with the same "
            f"inflate in-process. Prints {key}_vs_inprocess (in-process time / {transport} "
            "time).",
        )
        _memory_bench_args(tb, "guest memory to inflate per run", 5, "runs, median of them")
        tb.add_argument(
            "--busy-poll-us",
            type=int,
            default=DEFAULT_BUSY_POLL_US,
            metavar="US",
            help=f"vballoon serve's --busy-poll-us (default {DEFAULT_BUSY_POLL_US})",
        )
        tb.add_argument(
            f"--{driver}-poll-us",
            dest="driver_poll_us",
            type=int,
            default=DEFAULT_FRONTEND_POLL_US,
            metavar="US",
            help=f"the {driver} waits for each buffer as a KVM vCPU does: polls this long "
            "(KVM's default halt_poll_ns), then sleeps on the interrupt eventfd (default "
            f"{DEFAULT_FRONTEND_POLL_US}; 0: sleep at once)",
        )
        tb.set_defaults(func=_cmd_bench_transport)

    soak = bench_sub.add_parser(
        "soak",
        help="long running: does vballoon serve grow (memory, fds, mappings)?",
        description="Run vballoon serve as a child while a frontend connects and disconnects, "
        "doing inflate/deflate cycles, and control-socket sessions come and go; print the "
        "growth of the child's resident memory, fds and mappings from the first tenth of the "
        "work to the end: rss_growth_kib (goal <= 4096), fd_growth and maps_growth (goal "
        "<= 0). Exit status 1 if a goal is missed.",
    )
    soak.add_argument("--json", action="store_true", help="print one JSON object")
    soak.add_argument("--cycles", type=int, default=10_000, help="inflate/deflate cycles")
    soak.add_argument("--connects", type=int, default=1_000, help="frontend connections")
    soak.add_argument("--sessions", type=int, default=1_000, help="control-socket sessions")
    soak.set_defaults(func=_cmd_bench_soak)

    vmb = bench_sub.add_parser(
        "vm",
        help="the same guest with vballoon and with QEMU's own balloon (ratios vballoon/QEMU)",
        description="Boot the same Linux guest with vballoon and with QEMU's built-in balloon, "
        "alternating, and compare medians: inflate_time (target set to reached), "
        "inflate_device_cpu (vballoon process vs QEMU's main thread), "
        "report_512m_time_to_80pct (free page reporting of 512 MiB the guest freed), "
        "memory_returned. Needs the VM test environment (provisioned if missing).",
    )
    vmb.add_argument("--json", action="store_true", help="print one JSON object")
    vmb.add_argument(
        "--transport",
        choices=("vhost-user", "vfio-user"),
        default="vhost-user",
        help="how vballoon attaches to QEMU (default vhost-user)",
    )
    vmb.add_argument("--runs", type=int, default=3, help="runs per balloon (default 3)")
    vmb.add_argument("--mem", type=size_arg, default=2 << 30, help="guest memory (default 2G)")
    vmb.add_argument(
        "--target",
        type=size_arg,
        default=512 << 20,
        help="inflate target guest size (default 512M)",
    )
    vmb.set_defaults(func=_cmd_bench_vm)

    mig = sub.add_parser(
        "migrate",
        parents=[common],
        help="live-migrate a VM whose balloon is vballoon over vhost-user (unplug, migrate, "
        "plug again)",
        description="QEMU 11.1 will not migrate with vhost-user-test-device attached, so: "
        "remember the balloon's target, device_del it on the source (the guest takes its "
        "balloon back), migrate to a destination QEMU started with -incoming defer and the "
        "balloon's root port but no balloon, then chardev-add/device_add the balloon there "
        "to the vballoon serving on --dest-socket and set the target again. On a failure "
        "before the switchover the balloon goes back into the source. Progress on stderr.",
    )
    mig.add_argument(
        "--source-qmp", required=True, metavar="PATH", help="a QMP socket of the source QEMU"
    )
    mig.add_argument(
        "--dest-qmp", required=True, metavar="PATH", help="a QMP socket of the destination QEMU"
    )
    mig.add_argument(
        "--source-control",
        required=True,
        metavar="PATH",
        help="the source vballoon's control socket",
    )
    mig.add_argument(
        "--dest-control",
        required=True,
        metavar="PATH",
        help="the destination vballoon's control socket",
    )
    mig.add_argument(
        "--dest-socket",
        required=True,
        metavar="PATH",
        help="the vhost-user socket the destination vballoon serves",
    )
    mig.add_argument(
        "--uri", required=True, help="where the destination listens, e.g. unix:/run/mig.sock"
    )
    mig.add_argument(
        "--device-id", default="vballoon0", help="the balloon's -device id (default vballoon0)"
    )
    mig.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds for the unplug and for the plug (default 120)",
    )
    mig.add_argument(
        "--migrate-timeout",
        type=float,
        default=600.0,
        help="seconds for the migration itself (default 600)",
    )
    mig.add_argument(
        "--trim",
        action="store_true",
        help="on the destination, once the balloon is back: pause the VM, give back every "
        "all-zero page of guest RAM (the destination wrote every page it received, zeros "
        "too), resume; adds that pause to the downtime",
    )
    mig.add_argument(
        "--json", action="store_true", help="print the final query-migrate and the balloon as JSON"
    )
    mig.set_defaults(func=_cmd_migrate)

    trial = sub.add_parser(
        "trial",
        parents=[common],
        help="trials on real VMs (migrate: what a balloon buys a live migration)",
    )
    trial_sub = trial.add_subparsers(dest="trial", required=True, metavar="TRIAL")
    tm = trial_sub.add_parser(
        "migrate",
        help="migrate the same guest with no balloon, QEMU's, and vballoon's; compare",
        description="Boot the same 1 GiB guest per variant, hold 128 MiB checksummed, write "
        "and free the rest, let the balloon work, migrate it over a Unix socket to a second "
        "QEMU on this host (vballoon variants with vballoon migrate) and measure bytes sent, "
        "time, downtime, source and destination RAM, the checksum and the balloon after. "
        "Variants: none, qemu-reporting, qemu-hint, vballoon-reporting, "
        "vballoon-reporting-trim, vballoon-range-reports, vballoon-half. Needs the VM test "
        "environment (provisioned if missing).",
    )
    tm.add_argument("--json", action="store_true", help="print one JSON object")
    tm.add_argument(
        "--plot",
        default="trial-migrate.png",
        metavar="PNG",
        help="where to write the PNG of bytes sent over time (default trial-migrate.png)",
    )
    tm.add_argument(
        "--variant",
        action="append",
        metavar="NAME",
        help="run only this variant (repeatable; default all)",
    )
    tm.set_defaults(func=_cmd_trial_migrate)

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="boot a Linux guest under QEMU with vballoon and show memory coming back",
        description="Boot a Linux guest under QEMU with vballoon attached over vhost-user "
        "(provisioning QEMU 11.1 and a 6.12 guest kernel first if needed: root and a Debian "
        "mirror), balloon it, check its data, deflate, and show free page reporting, each "
        "step measured on the host. --in-process runs a simulated driver instead, no VM.",
    )
    demo.add_argument(
        "--size",
        type=size_arg,
        default=None,
        help="guest memory (default 1G; 512M with --in-process)",
    )
    demo.add_argument(
        "--in-process",
        action="store_true",
        help="no VM: a simulated Linux driver on rings in a memfd",
    )
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = args.log_level or ("info" if args.command == "serve" else "warning")
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except BalloonError as err:
        print(f"vballoon: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into head & co.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
