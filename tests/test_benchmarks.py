"""The benchmark suite itself: the tiny preset end to end (JSON schema, finite ratios,
table and plot written), and that every implementation it times computes the same loss."""
import json
import math

import pytest
import torch

from benchmarks import cases, measure, run
from benchmarks.cases import Case


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    run.run("tiny", out, device="cpu", quiet=True)
    return out


def test_tiny_preset_schema(tiny):
    data = json.loads((tiny / "tiny-cpu.json").read_text())
    assert data["schema"] == run.SCHEMA and data["preset"] == "tiny" and data["device"] == "cpu"
    assert data["complete"] is True
    env = data["env"]
    assert env["machine"]["cores"] >= 1 and env["machine"]["cpu"]
    assert env["versions"]["torch"] == torch.__version__
    assert env["git"]["commit"] is None or len(env["git"]["commit"]) == 40
    assert env["date"]
    ops = {row["op"] for row in data["results"]}
    assert ops == set(cases.OPS)
    for row in data["results"]:
        case = Case(**row["case"])
        assert row["floor"]["time_ms"] > 0
        assert "reference" in row["impls"], row["failed"]
        # every implementation was either measured, skipped with a reason, or failed
        tried = set(row["impls"]) | set(row["skipped"]) | set(row["failed"])
        assert tried == set(cases.IMPLS) - {"compile"}
        assert not row["failed"], row["failed"]
        for name, r in row["impls"].items():
            assert r["time_ms"] > 0 and r["reps"] >= 3 and r["mem_bytes"] >= 0
            assert cases.unavailable(case, name, "cpu") is None
        assert set(row["ratios"]) == set(row["impls"])
        if "lce" in row["impls"]:
            assert "lce" in row["ratios"]["reference"] and "eager" in row["ratios"]["lce"]
        # every op with matrix products gets its share of the GEMM peak of the same run
        assert data["gemm_peak_gflops"][case.dtype] > 0
        assert ("peak" in row["ratios"]["reference"]) == (case.op != "pool")


def test_tiny_preset_ratios_finite(tiny):
    data = json.loads((tiny / "tiny-cpu.json").read_text())
    values = [v for row in data["results"] for q in row["ratios"].values() for v in q.values()]
    assert values and all(math.isfinite(v) and v >= 0 for v in values)
    # the eager reference materialises logits: its memory growth is measurable
    assert all(row["impls"]["reference"]["mem_bytes"] > 0
               for row in data["results"] if row["op"] in ("ce", "pixel"))


def test_tiny_preset_table_and_plot(tiny):
    md = (tiny / "tiny-cpu.md").read_text()
    data = json.loads((tiny / "tiny-cpu.json").read_text())
    rows = sum(len(r["impls"]) + 1 for r in data["results"])
    main, options = md.split("Options against the plain fused op")
    assert main.count("\n| ") == rows + 1  # header + one line per implementation and floor
    # one line per option row and kernel backend, its ratio to its plain row
    kernels = [k for r in data["results"] if r["case"]["option"] for k in r["impls"]
               if k in cases.KERNELS]
    assert kernels and options.count("\n| ") == len(kernels) + 1
    assert "| ce | B=2 64x64 D=32 C=19 float32 | mask_bc | cpu |" in options
    png = (tiny / "tiny-cpu.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert run._sweeps(data["results"], "n") and run._sweeps(data["results"], "c")


SMALL = [Case(op="ce", n=300, d=16, c=19), Case(op="ce", n=300, d=16, c=19, grad2=True),
         Case(op="ce", mode="fwd", n=300, d=16, c=19),
         Case(op="consistency", n=300, d=16, c=19, grad2=True),
         Case(op="pixel", b=2, hw=7, d=16, c=5, grad2=True), Case(op="pool", b=2, hw=9, d=16, c=19),
         Case(op="pseudo", mode="fwd", n=300, d=16, c=19)]
SMALL += [Case(op="ce", b=2, hw=5, d=16, c=19, grad2=True, option=o)
          for o in cases.OPTIONS["ce"]]
SMALL += [Case(op="consistency", n=300, d=16, c=19, grad2=True, option="normalize"),
          Case(op="pixel", b=2, hw=7, d=16, c=5, grad2=True, option="normalize")]


def _outputs(case, impl):
    x = cases.make_inputs(case, "cpu", seed=3)
    out = cases.runner(case, impl, x)()
    if case.backward:
        return [x[k].grad for k in sorted(x) if x[k].requires_grad]
    return [out]


@pytest.mark.parametrize("case", SMALL,
                         ids=lambda c: f"{c.op}-{c.mode}-{c.grad2}-{c.option or 'plain'}")
def test_implementations_agree(case):
    """What is timed is the same computation: every runnable impl matches the reference
    (the loss forward, the input gradients after forward+backward)."""
    ref = _outputs(case, "reference")
    assert ref and all(torch.count_nonzero(r) > 0 for r in ref)
    for impl in cases.IMPLS:
        if impl in ("reference", "compile") or cases.unavailable(case, impl, "cpu"):
            continue
        for a, b in zip(_outputs(case, impl), ref):
            if a.dtype.is_floating_point:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            else:
                assert torch.equal(a, b)


def test_compile_competitor_matches_reference():
    case = Case(op="ce", n=300, d=16, c=19, grad2=True)
    for a, b in zip(_outputs(case, "compile"), _outputs(case, "reference")):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_gemm_flops_match_the_floor():
    for case in (Case(op="ce", n=64, d=8, c=5), Case(op="ce", n=64, d=8, c=5, grad2=True),
                 Case(op="consistency", n=64, d=8, c=5),
                 Case(op="pseudo", mode="fwd", n=64, d=8, c=5)):
        gemms = int(cases.floor(case, cases.make_inputs(case, "cpu"))[1].split()[0])
        assert cases.gemm_flops(case) == gemms * 2 * 64 * 8 * 5
    assert cases.gemm_flops(Case(op="pixel", b=2, hw=3, d=4, c=5)) == 2 * 2 * 2 * 81 * 4
    assert cases.gemm_flops(Case(op="pool", b=2, hw=3, d=4, c=5)) == 0


def test_floor_gemm_counts():
    x = cases.make_inputs(Case(op="ce", n=64, d=8, c=5), "cpu")
    assert cases.floor(Case(op="ce", n=64, d=8, c=5), x)[1] == "2 GEMM"
    assert cases.floor(Case(op="ce", mode="fwd", n=64, d=8, c=5), x)[1] == "1 GEMM"
    assert cases.floor(Case(op="ce", n=64, d=8, c=5, grad2=True), x)[1] == "3 GEMM"
    fn, _ = cases.floor(Case(op="ce", n=64, d=8, c=5, grad2=True), x)
    shapes = [tuple(t.shape) for t in fn()]
    assert shapes == [(64, 5), (64, 8), (5, 8)]


def test_case_validation():
    with pytest.raises(ValueError):
        Case(op="pseudo", mode="fwdbwd", n=8)
    with pytest.raises(ValueError):
        Case(op="softmax", n=8)
    assert Case(op="pool", b=2, hw=8).n == 128
    assert Case(op="ce", b=2, hw=8, option="mask_bc").n == 128
    with pytest.raises(ValueError, match="no option"):
        Case(op="pool", b=2, hw=8, option="normalize")


def test_memprobe_measures_the_logits():
    """The fresh-process probe sees the eager reference's N x C float32 logits (4 MiB here)
    and little beyond a few copies of them."""
    case = Case(op="ce", mode="fwd", n=16384, d=16, c=64)
    growth = measure.cpu_peak_extra(case.as_dict(), "reference", threads=1)
    assert 4 * 2**20 <= growth <= 64 * 2**20
