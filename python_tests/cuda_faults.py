"""pytest plugin: a kernel fault that breaks the CUDA context fails the test that caused it, and
not every test after it.

An illegal address, a misaligned access or a device-side assert leaves the process's CUDA
context unusable: every later test would fail at some unrelated synchronisation point. So the
test that hit it is reported, and then, under pytest-xdist, its worker process ends (xdist
replaces it with a fresh one, with a fresh context, and the remaining tests run); without xdist
the session stops there, naming the test and how to rerun without it.
"""

import os
import sys

import pytest

# Messages of CUDA errors after which the context cannot be used again.
STICKY_CUDA_ERRORS = (
    "an illegal memory access was encountered",
    "misaligned address",
    "unspecified launch failure",
    "an illegal instruction was encountered",
    "device-side assert triggered",
    "hardware stack error",
    "invalid program counter",
)


def is_sticky_cuda_error(message):
    return any(text in message for text in STICKY_CUDA_ERRORS)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (report.failed and call.excinfo is not None
            and is_sticky_cuda_error(str(call.excinfo.value))):
        return
    first_line = str(call.excinfo.value).strip().splitlines()[0]
    message = (f"CUDA context broken by {item.nodeid} ({first_line}); "
               f"rerun the rest with --deselect {item.nodeid}")
    if hasattr(item.config, "workerinput"):
        # An xdist worker: the controller reports this test as crashed and starts a new worker.
        print(message, file=sys.stderr, flush=True)
        os._exit(1)
    item.session.shouldstop = message
