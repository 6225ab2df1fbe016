"""The README's quick start runs as written (it is the first thing a user copies)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def test_quick_start_runs_as_written(capsys) -> None:
    pytest.importorskip("torchvision")
    section = README.read_text().split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md quick start", "exec"), {})
    assert re.fullmatch(r"loss \d+\.\d{3}, grad norm \d+\.\d{3}\n", capsys.readouterr().out)
