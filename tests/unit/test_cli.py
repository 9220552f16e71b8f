"""The command line: sizes, help, the benchmark's JSON interface, the demo."""

from __future__ import annotations

import argparse
import json

import pytest

from vballoon.cli import main
from vballoon.units import SizeError, parse_size

BENCH_KEYS = {
    "inflate_contig_vs_raw",
    "inflate_contig_vs_per_page",
    "inflate_shuffled_vs_raw",
    "report_2m_vs_raw",
    "decode_mpfn_per_s",
}


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("512M", 512 << 20),
        ("1G", 1 << 30),
        ("1g", 1 << 30),
        ("2GiB", 2 << 30),
        ("64K", 65536),
        ("1.5G", 3 << 29),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "12X", "-1G", "inf", "nan", "1e400G"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(SizeError):
        parse_size(text)


def test_help_explains(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        main(["bench", "discard", "--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert "fallocate" in out and "--json" in out


def test_bench_discard_json_interface(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "discard", "--json", "--size", "64M", "--repeat", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= BENCH_KEYS
    for key in BENCH_KEYS - {"decode_mpfn_per_s"}:
        assert result[key] > 0
    assert set(result["decode_mpfn_per_s"]) == {"pfn_array", "pfn_len", "pfn_order", "bitmap"}


def test_demo_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--in-process"]) == 0
    assert "demo passed" in capsys.readouterr().out


def test_bench_vhost_user_json_interface(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "vhost-user", "--json", "--size", "32M", "--repeat", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["vhost_user_vs_inprocess"] > 0
    assert result["seconds"]["vhost_user"] > 0 and result["seconds"]["inprocess"] > 0


def test_reserved_ranges_parse() -> None:
    from vballoon.cli import build_parser, gpa_range_arg

    assert gpa_range_arg("0x7f000000+16M") == (0x7F000000, 16 << 20)
    for bad in ("0x1000", "x+4K", "0x1000+0", "0x1000+-4K", f"{2**64 - 4096}+8K"):
        with pytest.raises(argparse.ArgumentTypeError):
            gpa_range_arg(bad)
    args = build_parser().parse_args(
        [
            "serve",
            "--socket",
            "s",
            "--control",
            "c",
            "--reserved",
            "0x100000+1M",
            "--reserved",
            "4G+2M",
        ]
    )
    assert args.reserved == [(1 << 20, 1 << 20), (4 << 30, 2 << 20)]
