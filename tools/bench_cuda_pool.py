"""Masked-average-pooling bandwidth on a GPU: the cuda backend's class sums against
index_add_, scatter_add_ and a one-hot einsum, each as a fraction of a device copy of the
features (the bandwidth bound: pooling reads the features once).

    python tools/bench_cuda_pool.py [--dtype bfloat16] [--classes 19 150 342 1000]
"""
import argparse

import torch

import mdp_kernels as mk


def timed(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps  # ms


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--hw", type=int, default=56)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--classes", type=int, nargs="+", default=[19, 150, 342, 1000])
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    b, d, hw = args.batch, args.dim, args.hw
    f = torch.randn(b, d, hw, hw, device="cuda", dtype=dtype)
    copy_ms = timed(lambda: f.clone())
    print(f"features {tuple(f.shape)} {args.dtype}: copy {copy_ms:.3f} ms "
          f"({2 * f.numel() * f.element_size() / copy_ms / 1e6:.0f} GB/s)")
    for c in args.classes:
        y = torch.randint(0, c, (b, hw, hw), device="cuda")
        y[torch.rand(y.shape, device="cuda") < 0.1] = 255
        pix = f.flatten(2).transpose(1, 2).reshape(-1, d).float()  # (N, D), outside the timing
        idx = (torch.arange(b, device="cuda")[:, None] * c + y.flatten(1).clamp(max=c - 1)).flatten()
        keep = (y.flatten() != 255)
        out = torch.zeros(b * c, d, device="cuda")
        ways = {
            "cuda kernel": lambda: mk.class_embedding_sums(f, y, c, backend="cuda"),
            "index_add_": lambda: out.zero_().index_add_(0, idx[keep], pix[keep]),
            "scatter_add_": lambda: out.zero_().scatter_add_(
                0, idx[:, None].expand(-1, d), pix * keep[:, None]),
            "one-hot einsum": lambda: torch.einsum(
                "bpc,bpd->bcd", torch.nn.functional.one_hot(y.flatten(1).clamp(max=c - 1), c)
                .to(f.dtype) * keep.view(b, -1, 1), f.flatten(2).transpose(1, 2)),
        }
        for name, fn in ways.items():
            ms = timed(fn)
            print(f"C={c:5d} {name:15s} {ms:8.3f} ms  {copy_ms / ms:6.2f} x copy")


if __name__ == "__main__":
    main()
