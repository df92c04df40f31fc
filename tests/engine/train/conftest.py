import subprocess
import sys

import pytest

from tests.helpers.torchrun import REPO


def _generate(out, num: int, seed: int):
    subprocess.run([sys.executable, "tools/make_demo_data.py", "--out", str(out), "--num", str(num), "--seed", str(seed)],
                   cwd=REPO, check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The generated visual-reasoning set (deterministic), written once per test session."""
    return _generate(tmp_path_factory.mktemp("demo_data"), 120, 0)


@pytest.fixture(scope="session")
def demo_valid_data(tmp_path_factory):
    """A validation split: the same generator with another seed."""
    return _generate(tmp_path_factory.mktemp("demo_valid"), 40, 1)
