"""The migration trial's report and PNG from a recorded result (no VM)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vm_harness.plots import have_matplotlib
from vm_harness.trial_migrate import NOT_POSSIBLE, format_trial, write_plot

MiB = 1 << 20


def _row(name: str, sent_mib: int) -> dict[str, object]:
    return {
        "variant": name,
        "what": name,
        "bytes_sent": sent_mib * MiB,
        "normal_bytes": sent_mib * MiB,
        "zero_pages": 1000,
        "total_time_ms": 3000,
        "downtime_ms": 40,
        "source_before_mib": 300,
        "source_peak_mib": 1024,
        "dest_after_mib": 1024,
        "dest_30s_mib": 1000,
        "checksum_ok": name != "bad",
        "balloon_after": "none",
        "sent_over_time": [(0.0, 0), (1.0, sent_mib * MiB // 2), (2.0, sent_mib * MiB)],
    }


RESULT = {
    "rows": [_row("none", 900), _row("vballoon-reporting", 250), _row("bad", 10)],
    "not_possible": NOT_POSSIBLE,
    "reporting_bytes_vs_none": 0.278,
    "vballoon_vs_qemu_reporting_bytes": None,
    "checksums_ok": 0,
    "dest_resident_vs_source": 3.3,
    "goals": {"reporting_bytes_vs_none": "<= 0.3", "checksums_ok": "= 1"},
    "guest": {"mem_mib": 1024, "hold_mib": 128, "accel": "tcg", "qemu": "11.1.3", "kernel": "x"},
    "machine": {"cpu": "test cpu", "cores": 2, "kernel": "6.x"},
}


def test_the_table_names_every_row_the_machine_and_the_goals() -> None:
    text = format_trial(RESULT)
    assert "tcg, QEMU 11.1.3" in text and "test cpu, 2 cores" in text
    assert "vballoon-reporting" in text and "250.0" in text
    assert "BAD" in text  # a bad checksum shows
    assert "vballoon-vfio-user" in text and "not measured" in text
    assert "reporting_bytes_vs_none = 0.278 (goal <= 0.3)" in text


@pytest.mark.skipif(not have_matplotlib(), reason="matplotlib (the plot extra) not installed")
def test_the_plot_is_a_png(tmp_path: Path) -> None:
    line = write_plot(RESULT, tmp_path / "t.png")
    assert line == f"plot: {tmp_path / 't.png'}"
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
