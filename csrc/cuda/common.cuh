// Shared helpers of the CUDA kernels (torch.ops.mdp_ext.*).
//
// Features are (B, D, P) views with arbitrary strides; a pixel is addressed by its flat index
// g = b * P + p, so tiles may straddle images and any layout (NCHW, channels-last, (N, D)
// seen as (1, D, N)) is read without a copy. All offsets are int64.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../acc.h"
#include "../settings.h"

namespace mdp {
namespace cuda {

// Deterministic (default): no float atomics anywhere, results are bitwise reproducible.
// config.deterministic = False lets class_sums add per-block partial sums with float
// atomics (one pass, no partial buffer) unless torch.use_deterministic_algorithms(True).
inline bool deterministic() {
  return settings().deterministic.load() || at::globalContext().deterministicAlgorithms();
}

// The current stream of the current device (at::cuda::getCurrentCUDAStream is this function;
// its header, ATen/cuda/CUDAContext.h, also needs the cuBLAS/cuSPARSE headers).
inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Strided (B, D, P) feature tensor; element (g, d) of pixel g = b * P + p.
template <typename T> struct Feats {
  const T* ptr;
  int64_t P, sb, sd, sp;
  __device__ __forceinline__ int64_t pixel(int64_t g) const { return (g / P) * sb + (g % P) * sp; }
};

template <typename T> Feats<T> feats_of(const at::Tensor& f) {
  return {f.const_data_ptr<T>(), f.size(2), f.stride(0), f.stride(1), f.stride(2)};
}

// Pixels are contiguous (NCHW-like): load tiles with consecutive threads on consecutive pixels;
// otherwise (channels-last, (N, D)) with consecutive threads on consecutive channels.
inline bool pixel_fast(const at::Tensor& f) { return f.size(2) > 1 && f.stride(2) == 1; }

inline void check_cuda(const at::Tensor& x, const at::Tensor& like, const char* name) {
  TORCH_CHECK(x.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(x.device() == like.device(), name, " is on ", x.device(), " but feats is on ",
              like.device());
}

inline void check_bdp(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 3, name, " must be (B, D, P), got ", x.sizes());
  TORCH_CHECK(x.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble ||
                  x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              name, " must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
}

inline void check_targets(const at::Tensor& t, const at::Tensor& feats, const char* name) {
  check_cuda(t, feats, name);
  TORCH_CHECK(t.scalar_type() == at::kLong && t.is_contiguous() && t.dim() == 2 &&
                  t.size(0) == feats.size(0) && t.size(1) == feats.size(2),
              name, " must be a contiguous int64 (B, P) tensor");
}

inline void check_per_pixel(const at::Tensor& x, const at::Tensor& feats, at::ScalarType dtype,
                            const char* name) {
  check_cuda(x, feats, name);
  TORCH_CHECK(x.scalar_type() == dtype && x.is_contiguous() && x.dim() == 2 &&
                  x.size(0) == feats.size(0) && x.size(1) == feats.size(2),
              name, " must be a contiguous ", dtype, " (B, P) tensor");
}

inline void check_protos(const at::Tensor& protos, const at::Tensor& feats) {
  check_cuda(protos, feats, "protos");
  TORCH_CHECK(protos.dim() == 2 && protos.size(1) == feats.size(1) && protos.is_contiguous() &&
                  protos.scalar_type() == feats.scalar_type(),
              "protos must be a contiguous (C, D) tensor of the features' dtype");
  TORCH_CHECK(protos.size(0) >= 1, "protos must have at least one class");
}

inline void check_bias(const std::optional<at::Tensor>& bias, const at::Tensor& protos) {
  if (!bias.has_value()) return;
  check_cuda(*bias, protos, "bias");
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->dim() == 1 &&
                  bias->size(0) == protos.size(0),
              "bias must be a contiguous float32 (C,) tensor (per-image (B, C) class masks are "
              "not implemented by the experimental cuda backend: use triton)");
}

}  // namespace cuda
}  // namespace mdp
