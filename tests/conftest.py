import importlib.util
import os

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors through the interpreter; this must be
# set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import mdp_kernels  # noqa: E402
from mdp_kernels import dispatch  # noqa: E402

KERNEL_BACKENDS = ("cpu", "triton", "cuda")


def expected_backends() -> set[str]:
    """Backends this machine builds, so a test of one of them fails rather than skips when
    it cannot run (a broken build must not pass as skips): cpu always (``make`` compiles
    it), triton when it is installed (on CPU through the interpreter), cuda when PyTorch
    sees a GPU and was built with CUDA. ``MDP_EXPECT_BACKENDS`` (comma-separated) overrides."""
    if "MDP_EXPECT_BACKENDS" in os.environ:
        return {b for b in os.environ["MDP_EXPECT_BACKENDS"].split(",") if b}
    names = {"cpu"}
    if importlib.util.find_spec("triton") is not None:
        names.add("triton")
    if torch.cuda.is_available() and torch.version.cuda:
        names.add("cuda")
    return names


def device_for(backend: str) -> torch.device:
    if backend == "cpu":
        return torch.device("cpu")
    if backend == "cuda" or torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")  # triton through the interpreter


def require(backend: str, ops: tuple[str, ...]) -> torch.device:
    """The device to test ``backend`` on; skips when it cannot run ``ops`` here, unless
    this machine is expected to run it (``expected_backends``): then the test fails."""
    device = device_for(backend)
    try:
        dispatch.resolve(ops, backend, device)
    except RuntimeError as exc:
        # cuda implements a subset of the phases by design: only its absence fails.
        partial = backend == "cuda" and dispatch.unavailable_reason("cuda") is None
        if backend in expected_backends() and not partial:
            pytest.fail(f"expected backend {backend!r} cannot run {ops}: {exc}")
        pytest.skip(str(exc))
    return device


@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
