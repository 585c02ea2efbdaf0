// PrototypeBank on CUDA: the slot update and the prototype recompute.
//
// bank_slot: S_j = sum_b [n_bj > 0] sums_bj / n_bj, n_j = sum_b [n_bj > 0], one thread per
// (j, d), images added in order. bank_prototypes: P_j = sum_s S_sj / max(sum_s n_sj, 1),
// optionally divided by max(|P_j|, 1e-12) (F.normalize), 0 where sum_s n_sj = 0; one block
// per class, slots added in order, the norm by a fixed-shape block reduction.
#include <torch/library.h>

#include "common.cuh"

namespace mdp {
namespace cuda {
namespace {

template <typename A>
__global__ void bank_slot_kernel(const A* sums, const int64_t* counts, A* S, A* n, int64_t B,
                                 int64_t C, int64_t D) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= C * D) return;
  const int64_t j = i / D, d = i % D;
  A s = A(0), m = A(0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t cnt = counts[b * C + j];
    if (cnt > 0) {
      s += sums[(b * C + j) * D + d] / static_cast<A>(cnt);
      m += A(1);
    }
  }
  S[i] = s;
  if (d == 0) n[j] = m;
}

std::tuple<at::Tensor, at::Tensor> bank_slot(const at::Tensor& sums, const at::Tensor& counts) {
  TORCH_CHECK(sums.is_cuda() && sums.dim() == 3, "sums must be a (B, C, D) CUDA tensor");
  TORCH_CHECK(sums.scalar_type() == at::kFloat || sums.scalar_type() == at::kDouble,
              "sums must be float32 or float64, got ", sums.scalar_type());
  check_cuda(counts, sums, "counts");
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.dim() == 2 &&
                  counts.size(0) == sums.size(0) && counts.size(1) == sums.size(1),
              "counts must be an int64 (B, C) tensor");
  const c10::cuda::CUDAGuard guard(sums.device());
  const int64_t B = sums.size(0), C = sums.size(1), D = sums.size(2);
  auto s = sums.contiguous();
  auto n_in = counts.contiguous();
  auto S = at::empty({C, D}, sums.options());
  auto n = at::zeros({C}, sums.options());
  if (C * D == 0) return {S, n};
  AT_DISPATCH_FLOATING_TYPES(sums.scalar_type(), "mdp_cuda_bank_slot", [&] {
    bank_slot_kernel<scalar_t><<<unsigned(ceil_div(C * D, 256)), 256, 0, stream()>>>(
        s.const_data_ptr<scalar_t>(), n_in.const_data_ptr<int64_t>(),
        S.mutable_data_ptr<scalar_t>(), n.mutable_data_ptr<scalar_t>(), B, C, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {S, n};
}

constexpr int kThreads = 256;

template <typename T>
__global__ void bank_prototypes_kernel(const T* S, const T* n, T* P, bool* valid, int64_t K,
                                       int64_t C, int64_t D, bool normalize) {
  using A = acc_t<T>;
  __shared__ A red[kThreads / 32];
  const int64_t j = blockIdx.x;
  A cnt = A(0);
  for (int64_t s = 0; s < K; ++s) cnt += static_cast<A>(n[s * C + j]);
  const bool ok = cnt > A(0);
  const A denom = cnt > A(1) ? cnt : A(1);  // n.clamp(min=1)
  A sq = A(0);
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    A v = A(0);
    for (int64_t s = 0; s < K; ++s) v += static_cast<A>(S[(s * C + j) * D + d]);
    v /= denom;
    sq += v * v;
    P[j * D + d] = static_cast<T>(v);  // this thread reads it back below
  }
  if (threadIdx.x == 0) valid[j] = ok;
  if (!normalize && ok) return;
  A den = A(1);
  if (ok) {  // ||P_j||, reduced in a fixed order: warp shuffles, then warp 0 over warps
    for (int off = 16; off > 0; off >>= 1) sq += __shfl_down_sync(0xffffffffu, sq, off);
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = sq;
    __syncthreads();
    if (threadIdx.x < 32) {
      A t = threadIdx.x < kThreads / 32 ? red[threadIdx.x] : A(0);
      for (int off = 16; off > 0; off >>= 1) t += __shfl_down_sync(0xffffffffu, t, off);
      if (threadIdx.x == 0) red[0] = t;
    }
    __syncthreads();
    const A norm = sqrt(red[0]);
    den = norm > A(1e-12) ? norm : A(1e-12);
  }
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    const A v = static_cast<A>(P[j * D + d]);
    P[j * D + d] = static_cast<T>(ok ? v / den : A(0));
  }
}

std::tuple<at::Tensor, at::Tensor> bank_prototypes(const at::Tensor& sums,
                                                   const at::Tensor& counts, bool normalize) {
  TORCH_CHECK(sums.is_cuda() && sums.dim() == 3, "sums must be a (K, C, D) CUDA tensor");
  check_cuda(counts, sums, "counts");
  TORCH_CHECK(counts.scalar_type() == sums.scalar_type() && counts.dim() == 2 &&
                  counts.size(0) == sums.size(0) && counts.size(1) == sums.size(1),
              "counts must be a (K, C) tensor of the dtype of sums");
  const c10::cuda::CUDAGuard guard(sums.device());
  const int64_t K = sums.size(0), C = sums.size(1), D = sums.size(2);
  auto s = sums.contiguous();
  auto n = counts.contiguous();
  auto P = at::empty({C, D}, sums.options());
  auto valid = at::empty({C}, sums.options().dtype(at::kBool));
  if (C == 0) return {P, valid};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, sums.scalar_type(), "mdp_cuda_bank_prototypes", [&] {
    bank_prototypes_kernel<scalar_t><<<unsigned(C), kThreads, 0, stream()>>>(
        s.const_data_ptr<scalar_t>(), n.const_data_ptr<scalar_t>(),
        P.mutable_data_ptr<scalar_t>(), valid.mutable_data_ptr<bool>(), K, C, D, normalize);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {P, valid};
}

}  // namespace

TORCH_LIBRARY_IMPL(mdp_ext, CUDA, m) {
  m.impl("bank_slot", &bank_slot);
  m.impl("bank_prototypes", &bank_prototypes);
}

}  // namespace cuda
}  // namespace mdp
