import os
import random
import sys
import zlib

# Idle OpenMP threads sleep instead of spinning. The suite shares the machine's cores with its
# own background processes (tests/background.py); with spinning waits a parallel region whose
# second thread lost its core stalled every C++ kernel test, which took 2.5 times as long beside
# one busy process. OpenMP reads the variable when torch loads it, so it is set before that.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

import background  # noqa: E402
import triton_interpreter  # noqa: E402

# Without a GPU the Triton kernels run in Triton's CPU interpreter. The flag is read when a
# kernel is decorated, so it must be set before fastalpha.backends.triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETER = triton_interpreter.install() if os.environ.get("TRITON_INTERPRET") == "1" else "not in use"

# Fresh random inputs every run; FASTALPHA_TEST_SEED=<n> replays a run (printed in the header).
RUN_SEED = int(os.environ.get("FASTALPHA_TEST_SEED", random.randrange(2**31)))


def pytest_report_header(config):
    return [f"fastalpha test seed: FASTALPHA_TEST_SEED={RUN_SEED}",
            f"triton interpreter: {INTERPRETER} (tests/triton_interpreter.py)"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Print the run seed with every failure, so that a failing draw can be replayed."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.append(("fastalpha test seed", f"replay with FASTALPHA_TEST_SEED={RUN_SEED}"))


def pytest_collection_modifyitems(config, items):
    # Tests that wait for background work run last, so that the work has the rest of the suite's
    # time to finish instead of the few tests in front of them (tests/background.py).
    items.sort(key=lambda item: item.get_closest_marker("background") is not None)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session", autouse=True)
def _background_set_ups(request, tmp_path_factory):
    """Start the selected modules' subprocess set-ups beside the tests (tests/background.py)."""
    background.start_modules(request.session.items, tmp_path_factory)
    yield
    background.shutdown()


@pytest.fixture
def gen(request):
    """A torch.Generator seeded from the run seed and the test id."""
    return torch.Generator().manual_seed(RUN_SEED ^ zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: tiny problems gain nothing from two, and a shared
    2-core machine makes parallel regions wait for descheduled threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def ieee_float32():
    """float32 matrix products in IEEE precision for the test, restored afterwards."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)
