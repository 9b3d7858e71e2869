"""The worker bounds OpenMP spin-waiting unless the environment chose a policy."""

import os
import subprocess
import sys

from worker.threads import DEFAULT_SPINCOUNT, configure_openmp_waiting


def test_threads_sets_spincount_when_unset():
    environ = {}
    assert configure_openmp_waiting(environ)
    assert environ == {"GOMP_SPINCOUNT": DEFAULT_SPINCOUNT}


def test_threads_keeps_user_choice():
    for chosen in ({"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "0"}):
        environ = dict(chosen)
        assert not configure_openmp_waiting(environ)
        assert environ == chosen


def test_threads_cli_sets_it_before_torch_loads():
    """The command line sets the variable in its own process before a command imports torch."""
    environ = {key: value for key, value in os.environ.items() if key not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = (
        "import os, sys\n"
        "from worker import cli\n"
        "try:\n"
        "    cli.main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True)
    assert result.stdout.splitlines()[-1] == f"{DEFAULT_SPINCOUNT} False"
