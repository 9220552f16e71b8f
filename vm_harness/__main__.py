"""``python -m vm_harness {provision,guest,probe,info}``: the VM test environment by hand."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from vm_harness.provision import KVM_PROBE_TIMEOUT, Lock, ProvisionError, cache_dir
from vm_harness.testenv import ensure_testenv
from vm_harness.vm import probe_accel


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m vm_harness",
        description="Provision the vballoon VM test environment: QEMU 11.1 and a Linux 6.12 "
        f"guest in a Debian 13 root (needs root and a Debian mirror; cache: {cache_dir()}, "
        "set $VBALLOON_TESTENV to move it).",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("provision", help="provision everything (idempotent)")
    p.add_argument("--no-guest", action="store_true", help="do not build the guest image")
    sub.add_parser("guest", help="(re)build the guest image if its inputs changed; print its path")
    p = sub.add_parser("probe", help="probe the accelerator (kvm or tcg) again")
    p.add_argument("--timeout", type=float, default=KVM_PROBE_TIMEOUT)
    sub.add_parser("info", help="provision if needed and print the environment as JSON")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "provision":
            env = ensure_testenv(build_guest=not args.no_guest)
            for k, v in env.to_json().items():
                print(f"{k:14} {' '.join(v) if isinstance(v, list) else v}")
        elif args.cmd == "guest":
            print(ensure_testenv().initramfs)
        elif args.cmd == "probe":
            env = ensure_testenv()
            with Lock(env.cache):
                print(probe_accel(env, force=True, timeout=args.timeout))
        elif args.cmd == "info":
            print(json.dumps(ensure_testenv().to_json(), indent=1))
    except ProvisionError as err:
        print(f"vballoon testenv: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
