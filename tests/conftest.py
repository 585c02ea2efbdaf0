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


def device_for(backend: str) -> torch.device:
    if backend == "cpu":
        return torch.device("cpu")
    if backend == "cuda" or torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")  # triton through the interpreter


def require(backend: str, ops: tuple[str, ...]) -> torch.device:
    """The device to test ``backend`` on; skips when it cannot run ``ops`` here."""
    device = device_for(backend)
    try:
        dispatch.resolve(ops, backend, device)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    return device


@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
