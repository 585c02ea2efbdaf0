"""pytest-benchmark suite: ``pytest benchmarks/`` (not part of ``make test``).

Every op, forward and forward+backward, for every implementation that can run it here
(eager reference, torch.compile of it, each kernel backend that registered the op, the
linear-cross-entropy competitors for the class loss); the rest are skipped with the reason.
Small shapes on CPU, the paper's N = 401,408 on a GPU. Compare runs with
``pytest benchmarks/ --benchmark-compare`` or group by case with
``--benchmark-group-by=param:case``.
"""
import pytest
import torch

from . import cases
from .cases import Case

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
N, D, HW = (401408, 256, 56) if GPU else (8192, 64, 32)
DT = "bfloat16" if GPU else "float32"


def _cases():
    out = []
    for mode in ("fwd", "fwdbwd"):
        out += [Case(op="ce", mode=mode, n=N, d=D, c=342, dtype=DT),
                Case(op="consistency", mode=mode, n=N, d=D, c=342, dtype=DT),
                Case(op="pixel", mode=mode, b=8 if GPU else 2, hw=HW, d=D, c=150, dtype=DT),
                Case(op="pool", mode=mode, b=8 if GPU else 2, hw=HW * 2, d=D, c=342, dtype=DT)]
    out += [Case(op="ce", n=N, d=D, c=342, dtype=DT, grad2=True),
            Case(op="pseudo", mode="fwd", n=N, d=D, c=342, dtype=DT)]
    return out


CASES = _cases()


@pytest.mark.parametrize("impl", cases.IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}-{c.mode}-{c.label()}" for c in CASES])
def test_op(benchmark, case, impl):
    why = cases.unavailable(case, impl, DEVICE)
    if why is not None:
        pytest.skip(why)
    x = cases.make_inputs(case, DEVICE)
    fn = cases.runner(case, impl, x)

    def call():
        out = fn()
        if GPU:
            torch.cuda.synchronize()
        return out
    benchmark.group = f"{case.op} {case.mode} {case.label()}"
    benchmark.extra_info.update(case.as_dict())
    benchmark.pedantic(call, warmup_rounds=2 if impl == "compile" else 1, rounds=5)
    if case.backward:
        assert torch.isfinite(x["f"].grad).all()
