// Shared-memory tiled pixel x class dot products, the first step of every prototype kernel.
//
// A block of 256 threads (16 x 16, tx = tid % 16, ty = tid / 16) computes a TL x TL tile
// of dot(f_g, P_c) for pixels g0 + ty + 16 i and classes c0 + tx + 16 j (i, j < M = TL/16),
// in the accumulation type, over D in chunks of 16 staged in shared memory. TL is 64 for
// float accumulation and 32 for double (shared-memory budget). Out-of-range pixels, classes
// and channels read as 0.
#pragma once
#include "common.cuh"

namespace mdp {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kChunk = 16;  // channels per staged chunk

template <typename A> struct TileOf { static constexpr int value = 64; };
template <> struct TileOf<double> { static constexpr int value = 32; };

template <typename A, int TL> struct DotSmem {
  A f[kChunk][TL + 1];  // [channel][pixel]; the padding keeps column stores conflict-free
  A p[kChunk][TL + 1];  // [channel][class]
};

__device__ __forceinline__ float ex(float x) { return expf(x); }
__device__ __forceinline__ double ex(double x) { return ::exp(x); }
__device__ __forceinline__ float ln(float x) { return logf(x); }
__device__ __forceinline__ double ln(double x) { return ::log(x); }

// acc[i][j] += sum_{k < K} a(k, i) * b(k, j), i, j < M: the register micro-GEMM of every
// tile product (logits, dz @ P, dz^T @ F). Each thread loads its M values of a and of b per
// step (from shared memory) and does M x M fused multiply-adds; k runs in order.
template <int K, typename A, int M, typename LoadA, typename LoadB>
__device__ __forceinline__ void mma_regs(A (&acc)[M][M], LoadA a_at, LoadB b_at) {
#pragma unroll 16
  for (int k = 0; k < K; ++k) {
    A a[M], b[M];
#pragma unroll
    for (int i = 0; i < M; ++i) a[i] = a_at(k, i);
#pragma unroll
    for (int j = 0; j < M; ++j) b[j] = b_at(k, j);
#pragma unroll
    for (int i = 0; i < M; ++i)
#pragma unroll
      for (int j = 0; j < M; ++j) acc[i][j] += a[i] * b[j];
  }
}

template <typename A, int M>
__device__ __forceinline__ void zero(A (&acc)[M][M]) {
#pragma unroll
  for (int i = 0; i < M; ++i)
#pragma unroll
    for (int j = 0; j < M; ++j) acc[i][j] = A(0);
}

template <typename T, typename A, int TL>
__device__ __forceinline__ void dot_tile(const Feats<T>& f, bool pix_fast, int64_t N, int64_t D,
                                         const T* protos, int64_t C, int64_t g0, int64_t c0,
                                         DotSmem<A, TL>& sm, A (&acc)[TL / 16][TL / 16]) {
  constexpr int M = TL / 16, LOADS = kChunk * TL / kThreads;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  zero(acc);
  // The (channel, pixel) slots this thread stages, and the pixels' offsets.
  int kk[LOADS], pp[LOADS];
  int64_t off[LOADS];
#pragma unroll
  for (int q = 0; q < LOADS; ++q) {
    const int i = tid + kThreads * q;
    kk[q] = pix_fast ? i / TL : i % kChunk;
    pp[q] = pix_fast ? i % TL : i / kChunk;
    off[q] = g0 + pp[q] < N ? f.pixel(g0 + pp[q]) : -1;
  }
  for (int64_t d0 = 0; d0 < D; d0 += kChunk) {
#pragma unroll
    for (int q = 0; q < LOADS; ++q) {
      const int64_t d = d0 + kk[q];
      sm.f[kk[q]][pp[q]] = off[q] >= 0 && d < D ? static_cast<A>(f.ptr[off[q] + d * f.sd]) : A(0);
      const int i = tid + kThreads * q, k = i % kChunk, c = i / kChunk;
      sm.p[k][c] = c0 + c < C && d0 + k < D ? static_cast<A>(protos[(c0 + c) * D + d0 + k]) : A(0);
    }
    __syncthreads();
    mma_regs<kChunk>(acc, [&](int k, int i) { return sm.f[k][ty + 16 * i]; },
                     [&](int k, int j) { return sm.p[k][tx + 16 * j]; });
    __syncthreads();
  }
}

}  // namespace cuda
}  // namespace mdp
