"""CPU pixel-to-pixel kernels (pix_fwd / pix_bwd): block-size and thread-count invariance
against a float64 reference of the kernel contract, on odd shapes with invalid pixels."""
import pytest
import torch

import mdp_kernels as mk
from conftest import require
from helpers import rel_err

TAU = 0.1


@pytest.fixture(autouse=True)
def _cpu():
    require("cpu", ("pix_fwd", "pix_bwd"))


def case(b=3, d=19, p=150, pk=171, dtype=torch.float32, seed=0):
    """Random (B, D, P) queries / (B, D, Pk) keys with ~20% invalid pixels; image 1 has no
    valid key and image 2 no valid query (when B >= 3)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, d, p, generator=g).to(dtype)
    k = torch.randn(b, d, pk, generator=g).to(dtype)
    qm = torch.rand(b, p, generator=g) > 0.2
    km = torch.rand(b, pk, generator=g) > 0.2
    if b >= 3:
        km[1] = False
        qm[2] = False
    gl = torch.rand(b, p, generator=g, dtype=torch.float64) + 0.5
    return q, k, qm, km, gl


def reference(q, k, qm, km, gl):
    """lse, dq, dk of the contract in float64, with the full P x Pk score matrix."""
    q, k = q.double(), k.double()
    s = torch.einsum("bdp,bdj->bpj", q, k) / TAU
    s = s.masked_fill(~km[:, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1)
    ok = qm & km.any(-1, keepdim=True)
    lse = torch.where(ok, lse, 0.0)
    a = torch.where(ok[..., None], torch.exp(s - lse[..., None]), 0.0) * gl[..., None]
    dq = torch.einsum("bpj,bdj->bdp", a, k) / TAU
    dk = torch.einsum("bpj,bdp->bdj", a, q) / TAU
    return lse, dq, dk


def kernels(q, k, qm, km, gl, need_q=True, need_k=True):
    ops = torch.ops.mdp_ext
    lse = ops.pix_fwd(q, k, qm, km, TAU)
    dq, dk = ops.pix_bwd(gl.to(lse.dtype), q, k, qm, km, lse, TAU, need_q, need_k)
    return lse, dq, dk


@pytest.mark.parametrize("rows,cols", [(1, 1), (7, 13), (64, 50), (1000, 1000), (None, None)])
def test_matches_reference_for_any_block_size(rows, cols):
    q, k, qm, km, gl = case()
    with mk.config.override(cpu_tile_rows=rows, cpu_pix_cols=cols):
        out = kernels(q, k, qm, km, gl)
    for name, a, r in zip(("lse", "dq", "dk"), out, reference(q, k, qm, km, gl)):
        assert a.dtype == (torch.float32 if name == "lse" else q.dtype)
        assert rel_err(a, r) <= 2e-6, f"{name}: {rel_err(a, r):.3g}"
    lse, dq, dk = out
    assert (lse[2] == 0).all() and (lse[1] == 0).all() and (dk[1] == 0).all()
    assert (dq[2] == 0).all() and (dq[1] == 0).all()
    assert (dq.permute(0, 2, 1)[~qm] == 0).all() and (dk.permute(0, 2, 1)[~km] == 0).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.bfloat16, 2e-2),
                                       (torch.float16, 4e-3)])
def test_dtypes(dtype, tol):
    q, k, qm, km, gl = case(b=2, d=24, p=77, pk=91, dtype=dtype, seed=1)
    with mk.config.override(cpu_pix_cols=40):
        out = kernels(q, k, qm, km, gl)
    for name, a, r in zip(("lse", "dq", "dk"), out, reference(q, k, qm, km, gl)):
        assert rel_err(a, r) <= tol, f"{name}: {rel_err(a, r):.3g}"


@pytest.mark.parametrize("b", [1, 3])
def test_thread_count_and_need_flags_do_not_change_bits(b):
    """One image per task (B >= threads) and one task per key block (B < threads) sum dK in
    the same order; dq / dk alone equal their values when both are asked for."""
    q, k, qm, km, gl = case(b=b, p=200, pk=130, seed=2)
    threads = torch.get_num_threads()
    try:
        with mk.config.override(cpu_tile_rows=32, cpu_pix_cols=48):
            outs = []
            for n in (1, 2, 4):
                torch.set_num_threads(n)
                outs.append(kernels(q, k, qm, km, gl))
            outs.append(kernels(q, k, qm, km, gl, need_k=False)[:2] +
                        kernels(q, k, qm, km, gl, need_q=False)[2:])
    finally:
        torch.set_num_threads(threads)
    for o in outs[1:]:
        for name, a, r in zip(("lse", "dq", "dk"), o, outs[0]):
            assert torch.equal(a, r), name


def test_strided_inputs():
    """A (B, P, D)-laid-out input (channels last) gives the same results and a gradient of
    the same layout."""
    q, k, qm, km, gl = case(b=2, d=16, p=60, pk=45, seed=3)
    qs, ks = q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(1, 2).contiguous().transpose(1, 2)
    a, b = kernels(q, k, qm, km, gl), kernels(qs, ks, qm, km, gl)
    for x, y in zip(a, b):
        assert rel_err(x, y) <= 1e-6
    assert b[1].stride() == qs.stride() and b[2].stride() == ks.stride()


def test_bad_cols():
    with pytest.raises(ValueError, match="config.cpu_pix_cols must be a positive int"):
        mk.config.cpu_pix_cols = 0
