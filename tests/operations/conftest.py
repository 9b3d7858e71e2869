"""Shared fixtures of the operations tests: repository paths and the external tools.

promtool (Debian package prometheus) and helm-python-sdk are installed by
deploy/install-tools.sh. Without them the tests that need them skip on a developer
machine and fail under CI (CI=true), so a CI run never passes without running them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CHART = REPO / "helm" / "sinkstream"


def missing_tool(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI must run deploy/install-tools.sh first")
    pytest.skip(f"{message}; run deploy/install-tools.sh")


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        missing_tool("promtool is not installed (Debian package prometheus)")
    return path


@pytest.fixture(scope="session")
def helm():
    try:
        import helm_python
    except ImportError:
        missing_tool("helm_python is not installed (PyPI package helm-python-sdk)")
    return helm_python
