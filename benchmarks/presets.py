"""Benchmark presets: lists of cases. Sweeps over N and over C (other parameters fixed)
become the plots; the acceptance configurations are the rows people quote."""
from __future__ import annotations

from .cases import OPTIONS, Case


def tiny() -> list[Case]:
    """CI smoke run (seconds): every op once, a 2-point sweep in N and in C, two CE
    options against their plain row."""
    ce = dict(op="ce", d=32)
    return [
        Case(**ce, n=4096, c=19), Case(**ce, n=16384, c=19), Case(**ce, n=4096, c=64, grad2=True),
        Case(**ce, n=4096, c=64),
        Case(op="consistency", n=4096, c=19, d=32),
        Case(op="pixel", b=2, hw=16, c=19, d=32),
        Case(op="pool", b=2, hw=32, c=19, d=32),
        Case(op="pseudo", mode="fwd", n=4096, c=19, d=32),
    ] + [Case(op="ce", b=2, hw=64, c=19, d=32, option=o) for o in ("", "mask_bc", "normalize")]


def cpu_small() -> list[Case]:
    """This machine, a few minutes. Contains the CPU acceptance configuration: fp32,
    forward+backward, N = 65,536, D = 256, C = 342 and 2048, prototypes detached and
    requiring grad; and the same in bf16."""
    n = 65536
    out = [Case(op="ce", n=n, c=c, grad2=g) for c in (342, 2048) for g in (False, True)]
    out += [Case(op="ce", n=16384, c=342)]  # N sweep; C sweep below 96: the saved softmax
    out += [Case(op="ce", n=n, c=c, grad2=g) for c in (19, 64) for g in (False, True)]
    out += [Case(op="ce", mode="fwd", n=n, c=342)]
    out += [Case(op="consistency", n=n, c=342, grad2=g) for g in (False, True)]
    out += [Case(op="consistency", n=n, c=2048)]
    out += [Case(op="pixel", b=8, hw=64, c=150)]
    out += [Case(op="pool", b=8, hw=hw, c=342) for hw in (64, 128)]
    out += [Case(op="pseudo", mode="fwd", n=n, c=c) for c in (342, 2048)]
    bf = dict(dtype="bfloat16")  # bf16 products at the hardware's bf16 rate (AVX512_BF16)
    out += [Case(op="ce", n=n, c=c, grad2=g, **bf) for c in (342, 2048) for g in (False, True)]
    out += [Case(op="consistency", n=n, c=342, **bf), Case(op="pixel", b=8, hw=64, c=150, **bf)]
    return out


def cpu_options() -> list[Case]:
    """The op options against the plain fused loss, on this machine (fp32, forward+backward,
    N = 65,536 = 16 images of 64 x 64, D = 256, C = 342): every CE option, and
    ``normalize`` for consistency and the pixel loss (their plain rows alongside)."""
    ce = [Case(op="ce", b=16, hw=64, c=342, option=o) for o in OPTIONS["ce"]]
    con = [Case(op="consistency", n=65536, c=342, option=o) for o in OPTIONS["consistency"]]
    pix = [Case(op="pixel", b=8, hw=64, c=150, option=o) for o in OPTIONS["pixel"]]
    return ce + con + pix


def paper() -> list[Case]:
    """GPU, the paper's sizes in bf16: N = 401,408 (128 images at 56x56), C = 342, D = 256;
    N = 1.6M and 6.4M (112x112, 224x224); C = 1024."""
    bf = dict(dtype="bfloat16")
    n0, ns = 401408, (1605632, 6422528)
    out = [Case(op="ce", n=n0, c=342, grad2=g, **bf) for g in (False, True)]
    out += [Case(op="ce", mode="fwd", n=n0, c=342, **bf)]
    out += [Case(op="ce", n=m, c=342, **bf) for m in ns]
    out += [Case(op="ce", n=n0, c=1024, grad2=g, **bf) for g in (False, True)]
    out += [Case(op="consistency", n=m, c=342, **bf) for m in (n0,) + ns]
    out += [Case(op="consistency", n=n0, c=c, grad2=True, **bf) for c in (342, 1024)]
    out += [Case(op="pixel", b=128, hw=hw, c=150, **bf) for hw in (28, 56)]
    out += [Case(op="pool", b=128, hw=hw, c=342, **bf) for hw in (56, 112, 224)]
    out += [Case(op="pseudo", mode="fwd", n=m, c=c, **bf) for m, c in ((n0, 342), (n0, 1024),
                                                                       (ns[0], 342))]
    return out


def gpu_check() -> list[Case]:
    """``make gpu-check`` (about 2 minutes on a GPU): the paper's acceptance rows first, so
    that a run cut short by its deadline keeps them. CE at N = 401,408, C = 342, D = 256,
    bf16 (prototypes detached, then with grad), CE at N = 6.4M (where eager may run out of
    memory), masked pooling (bandwidth), consistency and pseudo-labels at N = 401,408."""
    bf = dict(dtype="bfloat16")
    n0 = 401408
    return [Case(op="ce", n=n0, c=342, **bf), Case(op="ce", n=n0, c=342, grad2=True, **bf),
            Case(op="ce", n=6422528, c=342, **bf), Case(op="pool", b=128, hw=112, c=342, **bf),
            Case(op="consistency", n=n0, c=342, **bf),
            Case(op="pseudo", mode="fwd", n=n0, c=342, **bf)]


PRESETS = {"tiny": tiny, "cpu-small": cpu_small, "cpu-options": cpu_options, "paper": paper, "gpu-check": gpu_check}
