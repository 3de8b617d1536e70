"""relayrl-localstack's state file: what it cannot use counts as no stack, not a crash."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("text", ['{"server": "https://127.0.0.1:1"}', "[1, 2]", "not json"])
def test_status_and_down_treat_an_unusable_state_file_as_no_stack(
    tmp_path: Path, text: str
) -> None:
    (tmp_path / "state.json").write_text(text)
    for command, code, out in (("status", 1, "down"), ("down", 0, "no local stack")):
        done = subprocess.run(
            [str(BIN / "relayrl-localstack"), command, "--dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == code, done.stderr
        assert out in done.stdout + done.stderr
        assert "Traceback" not in done.stderr, done.stderr
