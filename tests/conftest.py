"""Shared fixtures: paths to the Penn Treebank copy shipped in the repository."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PTB = REPO / "data" / "ptb"


@pytest.fixture(scope="session")
def ptb_dir() -> Path:
    return PTB
