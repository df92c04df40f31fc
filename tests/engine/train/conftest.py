import subprocess
import sys

import pytest

from tests.helpers.torchrun import REPO


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The generated visual-reasoning set (deterministic), written once per test session."""
    out = tmp_path_factory.mktemp("demo_data")
    subprocess.run([sys.executable, "tools/make_demo_data.py", "--out", str(out), "--num", "120", "--seed", "0"],
                   cwd=REPO, check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def demo_valid_data(tmp_path_factory):
    """A validation split: the same generator with another seed."""
    out = tmp_path_factory.mktemp("demo_valid")
    subprocess.run([sys.executable, "tools/make_demo_data.py", "--out", str(out), "--num", "40", "--seed", "1"],
                   cwd=REPO, check=True, capture_output=True)
    return out
