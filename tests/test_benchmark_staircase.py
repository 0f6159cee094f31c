"""benchmarks/staircase.py: its summary of a staircase, and one tiny run end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from staircase import parse_widths, summarise  # noqa: E402


def test_summary_of_a_staircase():
    # Steps of 16 channels: 8 and 16 cost the same, 24 and 32 the same.
    summary = summarise({8: 1.0, 16: 1.0, 24: 2.0, 32: 2.0})
    assert summary["pairs"] == {"8->16": 1.0, "16->24": 2.0, "24->32": 1.0}
    # MACs-linear from the widest width: 0.5, 1.0, 1.5, 2.0 against 1, 1, 2, 2.
    assert summary["macs_linear_error_pct"] == pytest.approx((50 + 0 + 25 + 0) / 4, abs=0.1)
    assert summary["latency_ms"] == {"8": 1.0, "16": 1.0, "24": 2.0, "32": 2.0}


def test_widths_parsed():
    assert parse_widths("8:33:8") == [8, 16, 24, 32]
    assert parse_widths("16,8,16") == [8, 16]
    with pytest.raises(Exception, match="start:stop:step"):
        parse_widths("8-32")


def test_tiny_run_prints_json_and_plots(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "staircase.py"), "--in-channels", "4", "--size", "6",
         "--widths", "2,4", "--threads", "1", "--rounds", "1", "--warmup", "1", "--repeats", "2",
         "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["benchmark"] == "staircase"
    assert set(figures["threads"]["1"]["latency_ms"]) == {"2", "4"}
    assert (tmp_path / "staircase_t1.png").stat().st_size > 0
