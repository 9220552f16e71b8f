"""Command line: ``vballoon bench|demo`` (``serve`` and ``ctl`` arrive with the transports)."""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vballoon")
    parser.parse_args(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
