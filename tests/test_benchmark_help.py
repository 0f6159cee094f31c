"""Every benchmark script exits 0 on --help and describes each of its options."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(path.stem for path in (ROOT / "benchmarks").glob("*.py") if path.stem != "__init__")
# Scripts whose --help shows each option's default: "(default: ...)" or, for a None default, the text
# saying what None means.
SHOW_DEFAULTS = ("external", "gated_export", "gates", "staircase", "supernet_overhead", "supernet_ranking")
# An option line: two spaces, the invocation (single spaces inside, as in "--split TRAIN VAL TEST"),
# then two or more spaces and the help, or the help on the next, deeper indented lines.
OPTION = re.compile(r"^  (-\S+(?: \S+)*)(?: {2,}(\S.*))?$")


# Scripts run at once: each spends a few seconds importing torch, and a small CI machine has two cores.
PARALLEL = 2


@pytest.fixture(scope="module")
def help_outputs() -> dict[str, subprocess.CompletedProcess]:
    """Run every script's --help, PARALLEL at a time."""
    from concurrent.futures import ThreadPoolExecutor

    env = {**os.environ, "COLUMNS": "200"}

    def run_help(name: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--help"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=240)

    with ThreadPoolExecutor(PARALLEL) as pool:
        return dict(zip(SCRIPTS, pool.map(run_help, SCRIPTS)))


def option_help(text: str) -> dict[str, str]:
    """Map each option of a --help text to its help, wrapped lines joined with single spaces."""
    entries: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.split("options:", 1)[1].splitlines():
        match = OPTION.match(line)
        if match:
            current = entries.setdefault(match.group(1).split()[0].rstrip(","), [])
            if match.group(2):
                current.append(match.group(2))
        elif current is not None and line.startswith("   ") and line.strip():
            current.append(line.strip())
        else:
            current = None
    return {option: " ".join(lines) for option, lines in entries.items()}


def test_scripts_found() -> None:
    assert {"external", "gated_export", "gated_latency", "gates", "gpu_checks"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_describes_every_option(help_outputs, name: str) -> None:
    result = help_outputs[name]
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(f"usage: {name}.py")
    options = option_help(result.stdout)
    assert options["-h"] == "show this help message and exit"
    assert [option for option, text in options.items() if not text] == []


@pytest.mark.parametrize("name", SHOW_DEFAULTS)
def test_help_shows_defaults(help_outputs, name: str) -> None:
    options = option_help(help_outputs[name].stdout)
    options.pop("-h")
    assert [option for option, text in options.items() if "(default: " not in text and "None" not in text] == []


def test_help_fixed_option_texts(help_outputs) -> None:
    gates = option_help(help_outputs["gates"].stdout)
    assert gates["--keep-ratio"] == "gates.keep_ratio; None keeps the keep_ratio of conf/gates/feature.yaml"
    external = option_help(help_outputs["external"].stdout)
    assert external["--space"].endswith(f"(default: {ROOT / 'conf' / 'space' / 'mobilenet_imagenet.yaml'})")
    latency = option_help(help_outputs["gated_latency"].stdout)
    assert latency["--seed"] == "seed of the subnets, the held-out split and the network's weights (0)"
    assert latency["--out"] == "folder for gated_latency.json and the plots, created if missing (benchmark-gated-latency)"
