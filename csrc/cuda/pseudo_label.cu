// Pseudo-labels on CUDA: score_i = max_k (f_i . P_k + bias_k), label_i = the lowest k that
// attains it if score_i >= threshold, else ignore_index.
//
// A block owns TL pixels and streams over class tiles (prototype tiles in shared memory,
// logits_tile). Each thread keeps a running (max, argmax) for its pixels over the classes it
// sees in increasing order (strict > keeps the lowest index); the 16 threads sharing a pixel
// then merge, the larger score winning and the lower index on ties.
#include <torch/library.h>

#include "logits.cuh"

namespace mdp {
namespace cuda {
namespace {

template <typename T, typename A, int TL>
__global__ void __launch_bounds__(kThreads)
pseudo_label_kernel(Feats<T> f, bool pix_fast, int64_t N, int64_t D, const T* protos, int64_t C,
                    const float* bias, A threshold, int64_t ignore_index, int64_t* labels,
                    float* scores) {
  constexpr int M = TL / 16;
  __shared__ DotSmem<A, TL> sm;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t g0 = int64_t(blockIdx.x) * TL;
  A best[M];
  int64_t arg[M];
#pragma unroll
  for (int i = 0; i < M; ++i) best[i] = -INFINITY, arg[i] = 0;
  A acc[M][M];
  for (int64_t c0 = 0; c0 < C; c0 += TL) {
    dot_tile<T, A, TL>(f, pix_fast, N, D, protos, C, g0, c0, sm, acc);
#pragma unroll
    for (int j = 0; j < M; ++j) {
      const int64_t c = c0 + tx + 16 * j;
      if (c >= C) continue;
      const A b = bias ? static_cast<A>(bias[c]) : A(0);
#pragma unroll
      for (int i = 0; i < M; ++i) {
        const A z = acc[i][j] + b;
        if (z > best[i]) best[i] = z, arg[i] = c;
      }
    }
  }
#pragma unroll
  for (int i = 0; i < M; ++i) {
    for (int off = 8; off > 0; off >>= 1) {  // the 16 lanes of a half-warp share the pixel
      const A ob = __shfl_xor_sync(0xffffffffu, best[i], off);
      const int64_t oa = __shfl_xor_sync(0xffffffffu, arg[i], off);
      if (ob > best[i] || (ob == best[i] && oa < arg[i])) best[i] = ob, arg[i] = oa;
    }
    const int64_t g = g0 + ty + 16 * i;
    if (tx == 0 && g < N) {
      scores[g] = static_cast<float>(best[i]);
      labels[g] = best[i] >= threshold ? arg[i] : ignore_index;
    }
  }
}

std::tuple<at::Tensor, at::Tensor> pseudo_label(const at::Tensor& feats, const at::Tensor& protos,
                                                const std::optional<at::Tensor>& bias,
                                                double threshold, int64_t ignore_index) {
  check_bdp(feats, "feats");
  check_protos(protos, feats);
  check_bias(bias, protos);
  const c10::cuda::CUDAGuard guard(feats.device());
  const int64_t B = feats.size(0), D = feats.size(1), P = feats.size(2), N = B * P;
  auto labels = at::empty({B, P}, feats.options().dtype(at::kLong));
  auto scores = at::empty({B, P}, feats.options().dtype(at::kFloat));
  if (N == 0) return {labels, scores};
  const float* b = bias.has_value() ? bias->const_data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, feats.scalar_type(), "mdp_cuda_pseudo_label", [&] {
    using A = acc_t<scalar_t>;
    constexpr int TL = TileOf<A>::value;
    pseudo_label_kernel<scalar_t, A, TL><<<unsigned(ceil_div(N, TL)), kThreads, 0, stream()>>>(
        feats_of<scalar_t>(feats), pixel_fast(feats), N, D, protos.const_data_ptr<scalar_t>(),
        protos.size(0), b, static_cast<A>(threshold), ignore_index,
        labels.mutable_data_ptr<int64_t>(), scores.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {labels, scores};
}

}  // namespace

TORCH_LIBRARY_IMPL(mdp_ext, CUDA, m) { m.impl("pseudo_label", &pseudo_label); }

}  // namespace cuda
}  // namespace mdp
