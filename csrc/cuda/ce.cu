// Pixel-to-prototype cross-entropy on CUDA (kernel phases ce_fwd / ce_bwd).
//
// z_ik = f_i . P_k / tau + bias_k. Forward: a block owns TL pixels and streams over class
// tiles (dot_tile), keeping per thread an online softmax (running max m, sum s of
// exp(z - m)) and the target logits; the 16 threads sharing a pixel merge them. -inf logits
// (masked classes) are skipped, so exp(-inf - -inf) never occurs. Pixels with no target are
// written as zeros, and a tile of such pixels does no FLOPs.
//
// Backward recomputes logit tiles from the stored lse:
//   dz_ik = g_lse_i exp(z_ik - lse_i) + g_za_i [k = ta_i] + g_zb_i [k = tb_i]  (0 if skipped)
// dfeats: a block owns TL pixels; per class tile it stages dz / tau and a prototype tile in
// shared memory and adds dz @ P into its own rows of a zeroed fp32/fp64 buffer.
// dprotos: a block owns (class tile, pixel range); it adds dz^T @ F into its own slice of a
// per-range partial buffer, and the ranges are then added in a fixed order. No float atomics:
// both gradients are bitwise deterministic.
#include <torch/library.h>

#include "logits.cuh"

namespace mdp {
namespace cuda {
namespace {

// Loads the targets of pixels g0 + ty + 16 i (the rows of dot_tile); returns, block-wide,
// whether any pixel of the tile has a target.
template <int M>
__device__ __forceinline__ bool load_targets(const int64_t* ta, const int64_t* tb, int64_t N,
                                             int64_t g0, bool (&active)[M], int64_t (&a)[M],
                                             int64_t (&b)[M]) {
  const int ty = threadIdx.x / 16;
  int any = 0;
#pragma unroll
  for (int i = 0; i < M; ++i) {
    const int64_t g = g0 + ty + 16 * i;
    a[i] = g < N ? ta[g] : -1;
    b[i] = g < N && tb ? tb[g] : -1;
    active[i] = a[i] >= 0 || b[i] >= 0;
    any |= active[i];
  }
  return __syncthreads_or(any) != 0;
}

template <typename T, typename A, int TL>
__global__ void __launch_bounds__(kThreads)
ce_fwd_kernel(Feats<T> f, bool pix_fast, int64_t N, int64_t D, const T* protos, int64_t C,
              const float* bias, const int64_t* ta, const int64_t* tb, A tau, A* lse, A* za,
              A* zb) {
  constexpr int M = TL / 16;
  __shared__ DotSmem<A, TL> sm;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t g0 = int64_t(blockIdx.x) * TL;
  bool active[M];
  int64_t ka[M], kb[M];
  const bool any = load_targets<M>(ta, tb, N, g0, active, ka, kb);
  A m[M], s[M], va[M], vb[M];
#pragma unroll
  for (int i = 0; i < M; ++i) m[i] = -INFINITY, s[i] = va[i] = vb[i] = A(0);
  A acc[M][M];
  for (int64_t c0 = 0; any && c0 < C; c0 += TL) {
    dot_tile<T, A, TL>(f, pix_fast, N, D, protos, C, g0, c0, sm, acc);
#pragma unroll
    for (int j = 0; j < M; ++j) {
      const int64_t c = c0 + tx + 16 * j;
      if (c >= C) continue;
      const A b = bias ? static_cast<A>(bias[c]) : A(0);
#pragma unroll
      for (int i = 0; i < M; ++i) {
        const A z = acc[i][j] / tau + b;
        if (c == ka[i]) va[i] = z;
        if (c == kb[i]) vb[i] = z;
        if (z == -INFINITY) continue;
        if (z > m[i]) {
          s[i] = s[i] * ex(m[i] - z) + A(1);
          m[i] = z;
        } else {
          s[i] += ex(z - m[i]);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < M; ++i) {
    for (int off = 8; off > 0; off >>= 1) {  // the 16 lanes of a half-warp share the pixel
      const A om = __shfl_xor_sync(0xffffffffu, m[i], off);
      const A os = __shfl_xor_sync(0xffffffffu, s[i], off);
      const A mm = om > m[i] ? om : m[i];
      if (mm != -INFINITY) s[i] = s[i] * ex(m[i] - mm) + os * ex(om - mm);
      m[i] = mm;
      // Exactly one lane holds a pixel's target logit, the others hold 0: the sum is exact.
      va[i] += __shfl_xor_sync(0xffffffffu, va[i], off);
      vb[i] += __shfl_xor_sync(0xffffffffu, vb[i], off);
    }
    const int64_t g = g0 + ty + 16 * i;
    if (tx == 0 && g < N) {
      const bool on = active[i] && s[i] > A(0);
      lse[g] = on ? m[i] + ln(s[i]) : A(0);
      za[g] = on && ka[i] >= 0 ? va[i] : A(0);
      zb[g] = on && kb[i] >= 0 ? vb[i] : A(0);
    }
  }
}

// dz / tau of a TL x TL (pixel, class) tile into dz[pixel][class]; rows as in dot_tile.
template <typename T, typename A, int TL>
__device__ __forceinline__ void dz_tile(const Feats<T>& f, bool pix_fast, int64_t N, int64_t D,
                                        const T* protos, int64_t C, const float* bias,
                                        int64_t g0, int64_t c0, A tau, const bool* active,
                                        const int64_t* ka, const int64_t* kb, const A* gl,
                                        const A* ga, const A* gb, const A* ls,
                                        DotSmem<A, TL>& sm, A (*dz)[TL + 1]) {
  constexpr int M = TL / 16;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  A acc[M][M];
  dot_tile<T, A, TL>(f, pix_fast, N, D, protos, C, g0, c0, sm, acc);
#pragma unroll
  for (int j = 0; j < M; ++j) {
    const int64_t c = c0 + tx + 16 * j;
    const A b = c < C && bias ? static_cast<A>(bias[c]) : A(0);
#pragma unroll
    for (int i = 0; i < M; ++i) {
      A v = A(0);
      if (active[i] && c < C) {
        const A z = acc[i][j] / tau + b;
        if (z != -INFINITY) v = gl[i] * ex(z - ls[i]);
        if (c == ka[i]) v += ga[i];
        if (c == kb[i]) v += gb[i];
      }
      dz[ty + 16 * i][tx + 16 * j] = v / tau;
    }
  }
}

template <typename A, int M>
__device__ __forceinline__ void load_grads(const A* g_lse, const A* g_za, const A* g_zb,
                                           const A* lse, int64_t N, int64_t g0, A (&gl)[M],
                                           A (&ga)[M], A (&gb)[M], A (&ls)[M]) {
  const int ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < M; ++i) {
    const int64_t g = g0 + ty + 16 * i;
    const bool in = g < N;
    gl[i] = in ? g_lse[g] : A(0);
    ga[i] = in ? g_za[g] : A(0);
    gb[i] = in && g_zb ? g_zb[g] : A(0);
    ls[i] = in ? lse[g] : A(0);
  }
}

template <typename A, int TL> struct BwdSmem {
  DotSmem<A, TL> dot;
  A dz[TL][TL + 1];  // [pixel][class]
  A op[TL][TL + 1];  // second operand: prototypes [class][channel] or feats [pixel][channel]
};

// dfeats (B, D, P) contiguous, accumulation dtype, zeroed: += dz @ P over class tiles.
template <typename T, typename A, int TL>
__global__ void __launch_bounds__(kThreads)
ce_dfeats_kernel(Feats<T> f, bool pix_fast, int64_t N, int64_t D, const T* protos, int64_t C,
                 const float* bias, const int64_t* ta, const int64_t* tb, const A* g_lse,
                 const A* g_za, const A* g_zb, const A* lse, A tau, A* out) {
  constexpr int M = TL / 16, OPS = TL * TL / kThreads;
  __shared__ BwdSmem<A, TL> sm;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t g0 = int64_t(blockIdx.x) * TL;
  bool active[M];
  int64_t ka[M], kb[M];
  if (!load_targets<M>(ta, tb, N, g0, active, ka, kb)) return;  // zero rows already
  A gl[M], ga[M], gb[M], ls[M];
  load_grads<A, M>(g_lse, g_za, g_zb, lse, N, g0, gl, ga, gb, ls);
  // Output rows: pixel g0 + tx + 16 i (consecutive lanes, consecutive pixels), channel
  // d0 + ty + 16 j; base offsets of those pixels in the (B, D, P) output.
  int64_t base[M];
#pragma unroll
  for (int i = 0; i < M; ++i) {
    const int64_t g = g0 + tx + 16 * i;
    base[i] = g < N ? (g / f.P) * D * f.P + g % f.P : -1;
  }
  for (int64_t c0 = 0; c0 < C; c0 += TL) {
    dz_tile<T, A, TL>(f, pix_fast, N, D, protos, C, bias, g0, c0, tau, active, ka, kb, gl, ga,
                      gb, ls, sm.dot, sm.dz);
    for (int64_t d0 = 0; d0 < D; d0 += TL) {
#pragma unroll
      for (int q = 0; q < OPS; ++q) {  // prototype tile [class][channel], coalesced on channels
        const int i = tid + kThreads * q, c = i / TL, dd = i % TL;
        sm.op[c][dd] = c0 + c < C && d0 + dd < D ? static_cast<A>(protos[(c0 + c) * D + d0 + dd])
                                                 : A(0);
      }
      __syncthreads();  // also publishes dz
      A acc[M][M];
      zero(acc);
      mma_regs<TL>(acc, [&](int c, int i) { return sm.dz[tx + 16 * i][c]; },
                   [&](int c, int j) { return sm.op[c][ty + 16 * j]; });
#pragma unroll
      for (int i = 0; i < M; ++i)
#pragma unroll
        for (int j = 0; j < M; ++j) {
          const int64_t d = d0 + ty + 16 * j;
          if (base[i] >= 0 && d < D) out[base[i] + d * f.P] += acc[i][j];
        }
      __syncthreads();  // op and dz are rewritten next
    }
  }
}

// partial[split] (C, D), zeroed: += dz^T @ F over the pixel tiles of this split.
template <typename T, typename A, int TL>
__global__ void __launch_bounds__(kThreads)
ce_dprotos_kernel(Feats<T> f, bool pix_fast, int64_t N, int64_t D, const T* protos, int64_t C,
                  const float* bias, const int64_t* ta, const int64_t* tb, const A* g_lse,
                  const A* g_za, const A* g_zb, const A* lse, A tau, int64_t tiles_per_split,
                  A* partial) {
  constexpr int M = TL / 16, OPS = TL * TL / kThreads;
  __shared__ BwdSmem<A, TL> sm;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t c0 = int64_t(blockIdx.x) * TL;
  A* out = partial + int64_t(blockIdx.y) * C * D;
  const int64_t t_begin = int64_t(blockIdx.y) * tiles_per_split;
  const int64_t t_end = min(ceil_div(N, TL), t_begin + tiles_per_split);
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t g0 = t * TL;
    bool active[M];
    int64_t ka[M], kb[M];
    if (!load_targets<M>(ta, tb, N, g0, active, ka, kb)) continue;
    A gl[M], ga[M], gb[M], ls[M];
    load_grads<A, M>(g_lse, g_za, g_zb, lse, N, g0, gl, ga, gb, ls);
    dz_tile<T, A, TL>(f, pix_fast, N, D, protos, C, bias, g0, c0, tau, active, ka, kb, gl, ga,
                      gb, ls, sm.dot, sm.dz);
    for (int64_t d0 = 0; d0 < D; d0 += TL) {
#pragma unroll
      for (int q = 0; q < OPS; ++q) {  // feature tile [pixel][channel]
        const int i = tid + kThreads * q;
        const int r = pix_fast ? i % TL : i / TL, dd = pix_fast ? i / TL : i % TL;
        const int64_t g = g0 + r, d = d0 + dd;
        sm.op[r][dd] = g < N && d < D ? static_cast<A>(f.ptr[f.pixel(g) + d * f.sd]) : A(0);
      }
      __syncthreads();
      A acc[M][M];  // class c0 + ty + 16 i, channel d0 + tx + 16 j
      zero(acc);
      mma_regs<TL>(acc, [&](int r, int i) { return sm.dz[r][ty + 16 * i]; },
                   [&](int r, int j) { return sm.op[r][tx + 16 * j]; });
#pragma unroll
      for (int i = 0; i < M; ++i)
#pragma unroll
        for (int j = 0; j < M; ++j) {
          const int64_t c = c0 + ty + 16 * i, d = d0 + tx + 16 * j;
          if (c < C && d < D) out[c * D + d] += acc[i][j];
        }
      __syncthreads();
    }
  }
}

// out[i] = sum over splits s, in order, of partial[s][i].
template <typename A>
__global__ void sum_splits_kernel(const A* partial, A* out, int64_t splits, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  A s = A(0);
  for (int64_t k = 0; k < splits; ++k) s += partial[k * n + i];
  out[i] = s;
}

void check_ce_inputs(const at::Tensor& feats, const at::Tensor& protos, const at::Tensor& ta,
                     const std::optional<at::Tensor>& tb, const std::optional<at::Tensor>& bias,
                     double tau) {
  check_bdp(feats, "feats");
  check_protos(protos, feats);
  check_targets(ta, feats, "ta");
  if (tb.has_value()) check_targets(*tb, feats, "tb");
  check_bias(bias, protos);
  TORCH_CHECK(tau > 0, "tau must be positive, got ", tau);
}

// The smoothing weights' mean-logit term (sw, g_zq) has no CUDA kernel yet.
void refuse_smoothing(const std::optional<at::Tensor>& sw) {
  TORCH_CHECK(!sw.has_value(), "the cuda backend has no label_smoothing kernel; use "
              "backend='triton' (or 'reference')");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ce_fwd(
    const at::Tensor& feats, const at::Tensor& protos, const at::Tensor& ta,
    const std::optional<at::Tensor>& tb, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& sw, double tau) {
  check_ce_inputs(feats, protos, ta, tb, bias, tau);
  refuse_smoothing(sw);
  const c10::cuda::CUDAGuard guard(feats.device());
  const int64_t B = feats.size(0), D = feats.size(1), P = feats.size(2), N = B * P;
  const auto opts = feats.options().dtype(acc_scalar_type(feats.scalar_type()));
  auto lse = at::empty({B, P}, opts), za = at::empty({B, P}, opts), zb = at::empty({B, P}, opts);
  auto zq = at::zeros({B, P}, opts);
  if (N == 0) return {lse, za, zb, zq};
  const float* b = bias.has_value() ? bias->const_data_ptr<float>() : nullptr;
  const int64_t* tbp = tb.has_value() ? tb->const_data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, feats.scalar_type(), "mdp_cuda_ce_fwd", [&] {
    using A = acc_t<scalar_t>;
    constexpr int TL = TileOf<A>::value;
    ce_fwd_kernel<scalar_t, A, TL><<<unsigned(ceil_div(N, TL)), kThreads, 0, stream()>>>(
        feats_of<scalar_t>(feats), pixel_fast(feats), N, D, protos.const_data_ptr<scalar_t>(),
        protos.size(0), b, ta.const_data_ptr<int64_t>(), tbp, static_cast<A>(tau),
        lse.mutable_data_ptr<A>(), za.mutable_data_ptr<A>(), zb.mutable_data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {lse, za, zb, zq};
}

constexpr int64_t kMaxPartials = int64_t(1) << 25;  // dprotos partial elements per call

// Gradients not asked for come back undefined (None in Python), as in PyTorch's own
// backward ops.
std::tuple<at::Tensor, at::Tensor> ce_bwd(
    const at::Tensor& g_lse, const at::Tensor& g_za, const std::optional<at::Tensor>& g_zb,
    const std::optional<at::Tensor>& g_zq, const at::Tensor& feats, const at::Tensor& protos,
    const at::Tensor& ta, const std::optional<at::Tensor>& tb,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& sw,
    const at::Tensor& lse, double tau, bool need_feats, bool need_protos) {
  check_ce_inputs(feats, protos, ta, tb, bias, tau);
  refuse_smoothing(sw);
  const auto acc = acc_scalar_type(feats.scalar_type());
  check_per_pixel(g_lse, feats, acc, "g_lse");
  check_per_pixel(g_za, feats, acc, "g_za");
  check_per_pixel(lse, feats, acc, "lse");
  TORCH_CHECK(g_zb.has_value() == tb.has_value(), "g_zb must be given exactly when tb is");
  if (g_zb.has_value()) check_per_pixel(*g_zb, feats, acc, "g_zb");
  const c10::cuda::CUDAGuard guard(feats.device());
  const int64_t B = feats.size(0), D = feats.size(1), P = feats.size(2), N = B * P;
  const int64_t C = protos.size(0);
  at::Tensor dfeats, dprotos;
  const float* b = bias.has_value() ? bias->const_data_ptr<float>() : nullptr;
  const int64_t* tbp = tb.has_value() ? tb->const_data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, feats.scalar_type(), "mdp_cuda_ce_bwd", [&] {
    using A = acc_t<scalar_t>;
    constexpr int TL = TileOf<A>::value;
    const auto f = feats_of<scalar_t>(feats);
    const bool pf = pixel_fast(feats);
    const A* gzb = g_zb.has_value() ? g_zb->const_data_ptr<A>() : nullptr;
    const int64_t tiles = ceil_div(N, TL);
    if (need_feats) {
      auto out = at::zeros({B, D, P}, feats.options().dtype(acc));
      if (N > 0 && D > 0) {
        ce_dfeats_kernel<scalar_t, A, TL><<<unsigned(tiles), kThreads, 0, stream()>>>(
            f, pf, N, D, protos.const_data_ptr<scalar_t>(), C, b, ta.const_data_ptr<int64_t>(),
            tbp, g_lse.const_data_ptr<A>(), g_za.const_data_ptr<A>(), gzb,
            lse.const_data_ptr<A>(), static_cast<A>(tau), out.mutable_data_ptr<A>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      dfeats = out.to(feats.scalar_type());
    }
    if (need_protos) {
      const int64_t ctiles = ceil_div(C, TL);
      // Enough blocks to fill the device, with bounded partial buffers.
      int64_t splits = std::min(tiles, std::max<int64_t>(1, ceil_div(1024, ctiles)));
      splits = std::max<int64_t>(1, std::min(splits, kMaxPartials / std::max<int64_t>(1, C * D)));
      const int64_t per = std::max<int64_t>(1, ceil_div(tiles, splits));
      splits = std::max<int64_t>(1, ceil_div(tiles, per));
      auto partial = at::zeros({splits, C, D}, protos.options().dtype(acc));
      if (N > 0 && D > 0) {
        ce_dprotos_kernel<scalar_t, A, TL><<<dim3(unsigned(ctiles), unsigned(splits)), kThreads, 0,
                                             stream()>>>(
            f, pf, N, D, protos.const_data_ptr<scalar_t>(), C, b, ta.const_data_ptr<int64_t>(),
            tbp, g_lse.const_data_ptr<A>(), g_za.const_data_ptr<A>(), gzb,
            lse.const_data_ptr<A>(), static_cast<A>(tau), per, partial.mutable_data_ptr<A>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      at::Tensor sum = partial[0];
      if (splits > 1) {
        sum = at::empty({C, D}, partial.options());
        sum_splits_kernel<A><<<unsigned(ceil_div(C * D, 256)), 256, 0, stream()>>>(
            partial.const_data_ptr<A>(), sum.mutable_data_ptr<A>(), splits, C * D);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      dprotos = sum.to(protos.scalar_type());
    }
  });
  return {dfeats, dprotos};
}

}  // namespace

TORCH_LIBRARY_IMPL(mdp_ext, CUDA, m) {
  m.impl("ce_fwd", &ce_fwd);
  m.impl("ce_bwd", &ce_bwd);
}

}  // namespace cuda
}  // namespace mdp
