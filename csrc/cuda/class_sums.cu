// Class sums / masked average pooling on CUDA.
//
// Forward, sums[b, t_p, :] += f[b, :, p], counts[b, t_p] += 1 over pixels with t_p >= 0:
// a block owns (image b, pixel chunk, block of DB channels). It stages 32-pixel x DB-channel
// feature tiles in shared memory (coalesced, 16-byte vector loads when pixels are contiguous
// and aligned), and thread d adds channel d of each pixel, in pixel order, into the C x DB
// class accumulators: every accumulator has one writer and a fixed order, so no atomics.
// The accumulators live in shared memory when C * DB fits (DB = 128, 64 or 32), else in the
// block's own zeroed slice of global memory. With several chunks per image, blocks write
// per-chunk partials that a second kernel adds in chunk order (deterministic, the default);
// with mdp_kernels.config.deterministic = False shared-memory blocks add their partials with float atomics.
// Counts are integers: a shared-memory histogram per block, added with integer atomics.
//
// Backward, dfeats[b, d, p] = grad_sums[b, t_p, d] (0 for t_p < 0): a gather.
#include <torch/library.h>

#include "common.cuh"

namespace mdp {
namespace cuda {
namespace {

constexpr int kTile = 32;                // pixels per staged tile
constexpr int64_t kSmemBytes = 48 * 1024;  // default dynamic shared-memory limit
constexpr int64_t kMaxPartials = int64_t(1) << 24;  // partial-sum elements per call

template <typename T, typename A, bool SMEM, bool VEC>
__global__ void class_sums_kernel(Feats<T> f, int64_t D, bool pix_fast, const int64_t* tgt,
                                  int64_t C, int64_t chunk, A* out, int64_t nout, bool atomic) {
  extern __shared__ unsigned char smem_raw[];
  A* smem = reinterpret_cast<A*>(smem_raw);
  const int DB = blockDim.x, tid = threadIdx.x;
  const int64_t b = blockIdx.z, d0 = int64_t(blockIdx.y) * DB, d = d0 + tid;
  const int64_t p_begin = int64_t(blockIdx.x) * chunk;
  const int64_t p_end = min(f.P, p_begin + chunk);
  const int64_t slot = nout > 1 ? int64_t(blockIdx.x) : 0;
  A* dst = out + ((b * nout + slot) * C) * D;  // (C, D) rows of this block's output
  A* acc = SMEM ? smem : dst + d0;             // accumulator (k, tid) at acc[k * ld + tid]
  const int64_t ld = SMEM ? DB : D;
  A* tile = SMEM ? smem + C * DB : smem;  // [DB][kTile + 1]
  int* tt = reinterpret_cast<int*>(tile + DB * (kTile + 1));
  if (SMEM)
    for (int64_t i = tid; i < C * DB; i += DB) acc[i] = A(0);
  const T* fb = f.ptr + b * f.sb;
  const int64_t* tb = tgt + b * f.P;
  for (int64_t p0 = p_begin; p0 < p_end; p0 += kTile) {
    const int n = int(min(int64_t(kTile), p_end - p0));
    __syncthreads();  // the previous tile is consumed
    if (tid < kTile) tt[tid] = tid < n ? int(tb[p0 + tid]) : -1;
    if (VEC) {  // pixel-contiguous, 16-byte aligned rows, P a multiple of the vector width
      constexpr int V = 16 / sizeof(T);
      for (int i = tid; i < DB * (kTile / V); i += DB) {
        const int dd = i / (kTile / V), pv = (i % (kTile / V)) * V;
        if (d0 + dd < D && pv < n) {
          const uint4 raw = *reinterpret_cast<const uint4*>(fb + (d0 + dd) * f.sd + p0 + pv);
          const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
          for (int j = 0; j < V; ++j) tile[dd * (kTile + 1) + pv + j] = static_cast<A>(v[j]);
        }
      }
    } else {
      for (int i = tid; i < DB * kTile; i += DB) {
        const int dd = pix_fast ? i / kTile : i % DB, pp = pix_fast ? i % kTile : i / DB;
        if (d0 + dd < D && pp < n)
          tile[dd * (kTile + 1) + pp] = static_cast<A>(fb[(d0 + dd) * f.sd + (p0 + pp) * f.sp]);
      }
    }
    __syncthreads();
    if (d < D)
      for (int p = 0; p < n; ++p) {
        const int k = tt[p];
        if (k >= 0) acc[k * ld + tid] += tile[tid * (kTile + 1) + p];
      }
  }
  if (SMEM) __syncthreads();
  if (SMEM && d < D) {
    for (int64_t k = 0; k < C; ++k) {
      if (atomic)
        atomicAdd(dst + k * D + d, acc[k * DB + tid]);
      else
        dst[k * D + d] = acc[k * DB + tid];
    }
  }
}

// sums[b, c, d] = sum over chunks s, in order, of partials[b, s, c, d].
template <typename A>
__global__ void reduce_chunks_kernel(const A* partials, A* sums, int64_t nchunks, int64_t CD,
                                     int64_t total) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int64_t b = i / CD, r = i % CD;
  const A* src = partials + b * nchunks * CD + r;
  A s = A(0);
  for (int64_t k = 0; k < nchunks; ++k) s += src[k * CD];
  sums[i] = s;
}

// counts[b, t_p] += 1: a per-block shared histogram when C fits, else global atomics.
__global__ void counts_kernel(const int64_t* tgt, int64_t P, int64_t C, int64_t chunk,
                              unsigned long long* counts, bool smem_hist) {
  extern __shared__ unsigned char smem_raw[];
  int* hist = reinterpret_cast<int*>(smem_raw);
  const int64_t b = blockIdx.y, p_begin = int64_t(blockIdx.x) * chunk;
  const int64_t p_end = min(P, p_begin + chunk);
  unsigned long long* cb = counts + b * C;
  if (smem_hist) {
    for (int64_t i = threadIdx.x; i < C; i += blockDim.x) hist[i] = 0;
    __syncthreads();
  }
  for (int64_t p = p_begin + threadIdx.x; p < p_end; p += blockDim.x) {
    const int64_t k = tgt[b * P + p];
    if (k < 0) continue;
    if (smem_hist)
      atomicAdd(hist + k, 1);
    else
      atomicAdd(cb + k, 1ull);
  }
  if (smem_hist) {
    __syncthreads();
    for (int64_t i = threadIdx.x; i < C; i += blockDim.x)
      if (hist[i]) atomicAdd(cb + i, static_cast<unsigned long long>(hist[i]));
  }
}

template <typename T>
void launch_class_sums(const at::Tensor& feats, const at::Tensor& targets, at::Tensor& sums,
                       at::Tensor& counts) {
  using A = acc_t<T>;
  const int64_t B = feats.size(0), D = feats.size(1), P = feats.size(2), C = sums.size(1);
  const cudaStream_t stream = cuda::stream();
  const Feats<T> f = feats_of<T>(feats);
  const int64_t* tgt = targets.const_data_ptr<int64_t>();

  // Counts.
  const int64_t cchunk = 8192;
  const bool smem_hist = C * int64_t(sizeof(int)) <= kSmemBytes;
  counts_kernel<<<dim3(unsigned(ceil_div(P, cchunk)), unsigned(B)), 256,
                  smem_hist ? C * sizeof(int) : 0, stream>>>(
      tgt, P, C, cchunk, reinterpret_cast<unsigned long long*>(counts.mutable_data_ptr<int64_t>()),
      smem_hist);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (D == 0) return;
  // Sums: the widest channel block whose accumulators fit in shared memory.
  const int64_t dmax = ceil_div(D, 32) * 32;
  const auto bytes = [&](int64_t db, bool in_smem) {
    return ((in_smem ? C * db : 0) + db * (kTile + 1)) * int64_t(sizeof(A)) + kTile * 4;
  };
  int64_t DB = 0;
  for (int64_t db : {128, 64, 32})
    if (db <= dmax && bytes(db, true) <= kSmemBytes) { DB = db; break; }
  const bool in_smem = DB > 0;
  if (!in_smem) DB = std::min<int64_t>(128, dmax);
  const int64_t nd = ceil_div(D, DB);
  // Enough blocks to fill the device, at least 256 pixels per chunk, bounded partials.
  int64_t nchunks = std::min(ceil_div(P, 256), std::max<int64_t>(1, ceil_div(1024, B * nd)));
  nchunks = std::max<int64_t>(1, std::min(nchunks, kMaxPartials / std::max<int64_t>(1, B * C * D)));
  const int64_t chunk = ceil_div(ceil_div(P, nchunks), kTile) * kTile;  // keeps tiles aligned
  nchunks = ceil_div(P, chunk);
  const bool atomic = nchunks > 1 && in_smem && !deterministic();
  const bool partial = nchunks > 1 && !atomic;
  at::Tensor out = partial ? at::zeros({B, nchunks, C, D}, sums.options()) : sums;
  const bool vec = pixel_fast(feats) && P % (16 / sizeof(T)) == 0 &&
                   f.sb % (16 / sizeof(T)) == 0 && f.sd % (16 / sizeof(T)) == 0 &&
                   reinterpret_cast<uintptr_t>(f.ptr) % 16 == 0;
  const dim3 grid{unsigned(nchunks), unsigned(nd), unsigned(B)};
  const auto smem = size_t(bytes(DB, in_smem));
  const auto launch = [&](auto kernel) {
    kernel<<<grid, unsigned(DB), smem, stream>>>(f, D, pixel_fast(feats), tgt, C, chunk,
                                                  out.mutable_data_ptr<A>(), partial ? nchunks : 1,
                                                  atomic);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (in_smem)
    vec ? launch(class_sums_kernel<T, A, true, true>) : launch(class_sums_kernel<T, A, true, false>);
  else
    vec ? launch(class_sums_kernel<T, A, false, true>) : launch(class_sums_kernel<T, A, false, false>);
  if (partial) {
    const int64_t total = B * C * D;
    reduce_chunks_kernel<A><<<unsigned(ceil_div(total, 256)), 256, 0, stream>>>(
        out.const_data_ptr<A>(), sums.mutable_data_ptr<A>(), nchunks, C * D, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor> class_sums(const at::Tensor& feats, const at::Tensor& targets,
                                              int64_t num_classes) {
  check_bdp(feats, "feats");
  check_targets(targets, feats, "targets");
  TORCH_CHECK(num_classes >= 1, "num_classes must be positive, got ", num_classes);
  const c10::cuda::CUDAGuard guard(feats.device());
  const int64_t B = feats.size(0), D = feats.size(1), P = feats.size(2);
  auto sums = at::zeros({B, num_classes, D}, feats.options().dtype(acc_scalar_type(feats.scalar_type())));
  auto counts = at::zeros({B, num_classes}, targets.options());
  if (B == 0 || P == 0) return {sums, counts};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, feats.scalar_type(), "mdp_cuda_class_sums", [&] {
    launch_class_sums<scalar_t>(feats, targets, sums, counts);
  });
  return {sums, counts};
}

template <typename T, typename A>
__global__ void class_sums_bwd_kernel(const A* grad, const int64_t* tgt, T* out, int64_t C,
                                      int64_t D, int64_t P, int64_t total) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int64_t p = i % P, bd = i / P, d = bd % D, b = bd / D;
  const int64_t k = tgt[b * P + p];
  out[i] = k < 0 ? T(0) : static_cast<T>(grad[(b * C + k) * D + d]);
}

at::Tensor class_sums_bwd(const at::Tensor& grad_sums, const at::Tensor& feats,
                          const at::Tensor& targets) {
  check_bdp(feats, "feats");
  check_targets(targets, feats, "targets");
  check_cuda(grad_sums, feats, "grad_sums");
  const int64_t B = feats.size(0), D = feats.size(1), P = feats.size(2);
  TORCH_CHECK(grad_sums.dim() == 3 && grad_sums.size(0) == B && grad_sums.size(2) == D &&
                  grad_sums.scalar_type() == acc_scalar_type(feats.scalar_type()),
              "grad_sums must be (B, C, D) of the accumulation dtype");
  const c10::cuda::CUDAGuard guard(feats.device());
  auto g = grad_sums.contiguous();
  auto out = at::empty({B, D, P}, feats.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, feats.scalar_type(), "mdp_cuda_class_sums_bwd", [&] {
    using A = acc_t<scalar_t>;
    class_sums_bwd_kernel<scalar_t, A><<<unsigned(ceil_div(total, 256)), 256, 0,
                                         stream()>>>(
        g.const_data_ptr<A>(), targets.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(),
        g.size(1), D, P, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mdp_ext, CUDA, m) {
  m.impl("class_sums", &class_sums);
  m.impl("class_sums_bwd", &class_sums_bwd);
}

}  // namespace cuda
}  // namespace mdp
