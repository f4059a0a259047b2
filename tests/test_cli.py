"""Every command answers --help, and bad input gets one line and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys

import pytest

from labelwise.cli import COMMANDS, main

SUBCOMMANDS = [
    ["data"], ["data", "synth"], ["data", "check"], ["train"], ["infer"], ["pseudo-masks"],
    ["evaluate"], ["demo"], ["bench"], ["bench", "oap"],
]


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name, _, _ in COMMANDS:
        assert name in out


@pytest.mark.parametrize("argv", SUBCOMMANDS, ids=lambda a: " ".join(a))
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_unknown_command_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["trian"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "invalid choice" in err


def test_python_dash_m_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "labelwise", "evaluate", "semantic", "--pred", str(tmp_path / "nope"),
                           "--gt", f"voc:{tmp_path / 'missing'}", "--split", "val"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("labelwise: error:"), proc.stderr
