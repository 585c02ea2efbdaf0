// Per-pixel L2 normalisation (normalize_fwd / normalize_bwd) on CPU: F.normalize(x, dim=1)
// of a (B, D, P) view and its backward, each one pass over the features.
//
// Pixels go in chunks of 256 of one image: the chunk's squared norms accumulate over D
// (along P when P is the contiguous dim, so the inner loop vectorises), then the same
// chunk, now in cache, is written scaled. The backward does the same with the row dot
// y_i . g_i, so neither direction reads the features more than once from memory. Each
// tensor is read with its own strides (any layout).
#include <torch/library.h>

#include <cmath>

#include "tiles.h"

namespace mdp {
namespace {

constexpr int64_t kRows = 256;

// fn(b, p0, n) on every chunk of kRows pixels, in parallel.
template <typename F>
void for_chunks(int64_t B, int64_t P, const F& fn) {
  const Chunks ch(B, P, kRows);
  for_parts(ch.count, num_parts(ch.count), [&](int64_t, int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) fn(ch.image(g), ch.start(g), ch.size(g));
  });
}

// A chunk of one (B, D, P) tensor: element (d, i) of its n pixels is at p[d * sd + i * sp].
template <typename T>
struct View {
  T* p;
  int64_t sd, sp;
};

template <typename T>
View<T> chunk(const at::Tensor& t, int64_t b, int64_t p0) {
  return {const_cast<T*>(t.const_data_ptr<T>()) + b * t.stride(0) + p0 * t.stride(2),
          t.stride(1), t.stride(2)};
}

// fn(d, i) over a chunk's D x n elements: channel-outer with a unit-stride pixel loop when
// every tensor has P contiguous (the (B, D, P) layout: the inner loop vectorises), else
// pixel-outer. `unit` tells the caller's accessor that the pixel stride is 1.
template <typename F>
void each(int64_t D, int64_t n, bool unit, const F& fn) {
  if (unit) {
    for (int64_t d = 0; d < D; ++d)
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) fn(d, i, std::true_type());
  } else {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t d = 0; d < D; ++d) fn(d, i, std::false_type());
  }
}

// Element (d, i) of chunk view v; with a true_type the pixel stride is 1.
template <typename T, typename U>
inline T& at_(const View<T>& v, int64_t d, int64_t i, U unit) {
  return unit ? v.p[d * v.sd + i] : v.p[d * v.sd + i * v.sp];
}

template <typename T>
void normalize_fwd_kernel(const at::Tensor& x, at::Tensor& y, at::Tensor& norm, double eps) {
  using A = acc_t<T>;
  const int64_t B = x.size(0), D = x.size(1), P = x.size(2);
  const bool unit = x.stride(2) == 1 && y.stride(2) == 1;
  A* nrm = norm.mutable_data_ptr<A>();
  for_chunks(B, P, [&](int64_t b, int64_t p0, int64_t n) {
    const View<T> src = chunk<T>(x, b, p0), dst = chunk<T>(y, b, p0);
    A ss[kRows] = {}, inv[kRows];
    each(D, n, unit, [&](int64_t d, int64_t i, auto u) {
      const A v = static_cast<A>(at_(src, d, i, u));
      ss[i] += v * v;
    });
    for (int64_t i = 0; i < n; ++i) {
      const A r = std::sqrt(ss[i]);
      nrm[b * P + p0 + i] = r;
      inv[i] = A(1) / std::max(r, static_cast<A>(eps));
    }
    each(D, n, unit, [&](int64_t d, int64_t i, auto u) {
      at_(dst, d, i, u) = static_cast<T>(static_cast<A>(at_(src, d, i, u)) * inv[i]);
    });
  });
}

// dx_i = (g_i - y_i (y_i . g_i)) / |x_i| where |x_i| >= eps, else g_i / eps (the clamp
// passes no gradient to the norm): F.normalize's backward.
template <typename T>
void normalize_bwd_kernel(const at::Tensor& g, const at::Tensor& y, const at::Tensor& norm,
                          at::Tensor& dx, double eps) {
  using A = acc_t<T>;
  const int64_t B = y.size(0), D = y.size(1), P = y.size(2);
  const bool unit = g.stride(2) == 1 && y.stride(2) == 1 && dx.stride(2) == 1;
  const A* nrm = norm.const_data_ptr<A>();
  for_chunks(B, P, [&](int64_t b, int64_t p0, int64_t n) {
    const View<T> gv = chunk<T>(g, b, p0), yv = chunk<T>(y, b, p0), dst = chunk<T>(dx, b, p0);
    A dot[kRows] = {}, inv[kRows];
    each(D, n, unit, [&](int64_t d, int64_t i, auto u) {
      dot[i] += static_cast<A>(at_(yv, d, i, u)) * static_cast<A>(at_(gv, d, i, u));
    });
    for (int64_t i = 0; i < n; ++i) {
      const A r = nrm[b * P + p0 + i];
      const bool proj = r >= static_cast<A>(eps);
      inv[i] = A(1) / (proj ? r : static_cast<A>(eps));
      if (!proj) dot[i] = A(0);
    }
    each(D, n, unit, [&](int64_t d, int64_t i, auto u) {
      at_(dst, d, i, u) = static_cast<T>(
          (static_cast<A>(at_(gv, d, i, u)) - static_cast<A>(at_(yv, d, i, u)) * dot[i]) *
          inv[i]);
    });
  });
}

std::tuple<at::Tensor, at::Tensor> normalize_fwd(const at::Tensor& x, double eps) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_bdp(x, "x");
  auto y = empty_like_bdp(x);
  const auto acc = acc_scalar_type(x.scalar_type());
  auto norm = at::empty({x.size(0), x.size(2)}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "normalize_fwd", [&] {
    normalize_fwd_kernel<scalar_t>(x, y, norm, eps);
  });
  return {y, norm};
}

at::Tensor normalize_bwd(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& norm,
                         double eps) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_bdp(y, "y");
  TORCH_CHECK(grad.sizes() == y.sizes() && grad.scalar_type() == y.scalar_type(),
              "grad must have y's shape and dtype, got ", grad.sizes(), " ", grad.scalar_type());
  check_bp(norm, y.size(0), y.size(2), acc_scalar_type(y.scalar_type()), "norm");
  const auto nrm = norm.contiguous();
  auto dx = empty_like_bdp(y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "normalize_bwd", [&] {
    normalize_bwd_kernel<scalar_t>(grad, y, nrm, dx, eps);
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(mdp_ext, CPU, m) {
  m.impl("normalize_fwd", &normalize_fwd);
  m.impl("normalize_bwd", &normalize_bwd);
}

}  // namespace mdp
