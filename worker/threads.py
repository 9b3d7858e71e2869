"""The wait policy of the worker's OpenMP threads between operations.

torch runs each operation on an OpenMP thread pool (GNU libgomp in the CPU wheels). A
decode step is several hundred short operations, so threads that sleep between them
(``OMP_WAIT_POLICY=PASSIVE``) pay a wake-up for each one, and single-stream decode ran
about 1.25x slower that way on a 2-core machine. Threads that spin for libgomp's default
of 300,000 iterations keep the cores busy while another process needs them: with a
second CPU-bound job on the same cores, a single-token step took 1.9 s in place of 40 ms.
Spinning for 10,000 iterations gave the speed of the default on idle cores (1.56x
against transformers, the default 1.57x) and 40 ms per step beside the other job.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

DEFAULT_SPINCOUNT = "10000"


def configure_openmp_waiting(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Bound OpenMP spin-waiting unless the environment chose a policy; return True if it set one.

    libgomp reads these variables when it loads, so this must run before torch is imported.
    ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` in the environment wins.
    """
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return False
    environ["GOMP_SPINCOUNT"] = DEFAULT_SPINCOUNT
    return True
