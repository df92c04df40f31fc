"""Fixtures for tests/engine/data: a small generated visual-reasoning set."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.data.visual_reasoning import write_demo_set


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    write_demo_set(out, 30, seed=0)
    return out
