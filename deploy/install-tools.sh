#!/usr/bin/env bash
# Install the tools that the operations tests (tests/operations) need. Safe to run again:
# each step is skipped when its tool is already there.
#   promtool          Debian package prometheus (rule and config checks, rule unit tests)
#   helm-python-sdk   PyPI wheel with Helm's Go library (lint, render, schema validation)
# Usage: deploy/install-tools.sh [PYTHON]   (default: python3 on PATH, e.g. the project venv's)
set -euo pipefail

PYTHON="${1:-python3}"
HELM_PYTHON_SDK_VERSION="0.2.2"

if ! command -v promtool >/dev/null 2>&1; then
    echo "install-tools: installing promtool (Debian package prometheus)"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
promtool --version | head -n 1

if ! "$PYTHON" -c "import helm_python" >/dev/null 2>&1; then
    echo "install-tools: installing helm-python-sdk==${HELM_PYTHON_SDK_VERSION}"
    "$PYTHON" -m pip install --quiet "helm-python-sdk==${HELM_PYTHON_SDK_VERSION}"
fi
"$PYTHON" -c "import helm_python; print('helm-python-sdk', helm_python.__version__)"
