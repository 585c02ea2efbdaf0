// Pixel-to-pixel logsumexp (pix_fwd / pix_bwd) on CPU, one image per task.
//
// Per image the valid keys are gathered once into an (nk, D) matrix K / tau; queries are
// walked in blocks sized so the block x nk score tile stays about L2-sized, so memory is
// O((P + Pk) D) per image, never P x Pk. The backward recomputes each tile from the saved
// lse: A = g * exp(S - lse), dQ = A @ (K / tau), dK += A^T @ Q (then / tau). Images are
// independent, so results do not depend on the thread count.
#include <torch/library.h>

#include "tiles.h"

namespace mdp {
namespace {

inline int64_t valid_idx(const bool* m, int64_t n, int64_t* idx) {
  int64_t nv = 0;
  for (int64_t i = 0; i < n; ++i)
    if (m[i]) idx[nv++] = i;
  return nv;
}

void pix_check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& qmask,
               const at::Tensor& kmask) {
  check_bdp(q, "q");
  check_bdp(k, "k");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) &&
                  q.scalar_type() == k.scalar_type(),
              "q and k must share batch size, channels and dtype");
  check_bp(qmask, q.size(0), q.size(2), at::kBool, "qmask");
  check_bp(kmask, k.size(0), k.size(2), at::kBool, "kmask");
}

// One image: the forward writes lse_out; the backward (g_lse given) reads lse.
template <typename T>
void pix_image(int64_t b, const at::Tensor& q, const at::Tensor& k, const bool* qm,
               const bool* km, double tau, acc_t<T>* lse_out, const acc_t<T>* lse,
               const acc_t<T>* g_lse, at::Tensor* dq, at::Tensor* dk) {
  using A = acc_t<T>;
  const int64_t D = q.size(1), P = q.size(2), Pk = k.size(2);
  const auto opts = q.options().dtype(acc_scalar_type(q.scalar_type()));
  std::vector<int64_t> kidx(Pk);
  const int64_t nk = valid_idx(km + b * Pk, Pk, kidx.data());
  const int64_t rows = std::min<int64_t>(tile_rows(nk), std::max<int64_t>(P, 1));
  std::vector<int64_t> idx(rows);
  auto qbuf = at::empty({rows, D}, opts), dbuf = at::empty({rows, D}, opts);
  if (nk == 0) {  // no key: lse stays 0 and every gradient is 0
    if (dq)
      for (int64_t p0 = 0; p0 < P; p0 += rows)
        store_rows<T>(*dq, b, p0, std::min(rows, P - p0), idx.data(), 0, dbuf);
    if (dk) store_rows<T>(*dk, b, 0, Pk, kidx.data(), 0, dbuf);
    return;
  }
  auto kbuf = at::empty({nk, D}, opts);
  const auto ks = load_rows<T>(k, b, 0, Pk, kidx.data(), nk, kbuf).mul(1.0 / tau);
  const auto kst = ks.t();
  auto tile = at::empty({rows, nk}, opts), col = at::empty({rows}, opts);
  at::Tensor dkacc;
  if (dk) dkacc = at::zeros({nk, D}, opts);
  for (int64_t p0 = 0; p0 < P; p0 += rows) {
    const int64_t n = std::min(rows, P - p0), off = b * P + p0;
    const int64_t nv = valid_idx(qm + off, n, idx.data());
    if (nv == 0) {
      if (dq) store_rows<T>(*dq, b, p0, n, idx.data(), 0, dbuf);
      continue;
    }
    auto f = load_rows<T>(q, b, p0, n, idx.data(), nv, qbuf);
    auto s = tile.narrow(0, 0, nv);
    at::mm_out(s, f, kst);
    if (g_lse == nullptr) {
      auto m = at::amax(s, {1}, true);
      auto l = s.sub_(m).exp_().sum({1}, true).log_().add_(m);
      const A* lp = l.const_data_ptr<A>();
      for (int64_t i = 0; i < nv; ++i) lse_out[off + idx[i]] = lp[i];
      continue;
    }
    s.sub_(gather_col(lse + off, idx.data(), nv, col)).exp_();
    s.mul_(gather_col(g_lse + off, idx.data(), nv, col));
    if (dq) {
      auto d = dbuf.narrow(0, 0, nv);
      at::mm_out(d, s, ks);
      store_rows<T>(*dq, b, p0, n, idx.data(), nv, d);
    }
    if (dk) dkacc.addmm_(s.t(), f);
  }
  if (dk) store_rows<T>(*dk, b, 0, Pk, kidx.data(), nk, dkacc.mul_(1.0 / tau));
}

at::Tensor pix_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& qmask,
                   const at::Tensor& kmask, double tau) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // inputs may require grad
  pix_check(q, k, qmask, kmask);
  const auto qm = qmask.contiguous(), km = kmask.contiguous();
  auto lse = at::zeros({q.size(0), q.size(2)}, q.options().dtype(acc_scalar_type(q.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "pix_fwd", [&] {
    at::parallel_for(0, q.size(0), 1, [&](int64_t begin, int64_t end) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      for (int64_t b = begin; b < end; ++b)
        pix_image<scalar_t>(b, q, k, qm.const_data_ptr<bool>(), km.const_data_ptr<bool>(), tau,
                            lse.mutable_data_ptr<acc_t<scalar_t>>(), nullptr, nullptr, nullptr,
                            nullptr);
    });
  });
  return lse;
}

std::tuple<at::Tensor, at::Tensor> pix_bwd(const at::Tensor& g_lse, const at::Tensor& q,
                                           const at::Tensor& k, const at::Tensor& qmask,
                                           const at::Tensor& kmask, const at::Tensor& lse,
                                           double tau, bool need_q, bool need_k) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // inputs may require grad
  pix_check(q, k, qmask, kmask);
  const auto acc = acc_scalar_type(q.scalar_type());
  const auto g = g_lse.contiguous(), l = lse.contiguous();
  check_bp(g, q.size(0), q.size(2), acc, "g_lse");
  check_bp(l, q.size(0), q.size(2), acc, "lse");
  const auto qm = qmask.contiguous(), km = kmask.contiguous();
  at::Tensor dq, dk;
  if (need_q) dq = empty_like_bdp(q);
  if (need_k) dk = empty_like_bdp(k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "pix_bwd", [&] {
    using A = acc_t<scalar_t>;
    at::parallel_for(0, q.size(0), 1, [&](int64_t begin, int64_t end) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      for (int64_t b = begin; b < end; ++b)
        pix_image<scalar_t>(b, q, k, qm.const_data_ptr<bool>(), km.const_data_ptr<bool>(), tau,
                            nullptr, l.const_data_ptr<A>(), g.const_data_ptr<A>(),
                            need_q ? &dq : nullptr, need_k ? &dk : nullptr);
    });
  });
  return {dq, dk};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mdp_cpu, m) {
  m.def("pix_fwd(Tensor q, Tensor k, Tensor qmask, Tensor kmask, float tau) -> Tensor");
  m.def("pix_bwd(Tensor g_lse, Tensor q, Tensor k, Tensor qmask, Tensor kmask, Tensor lse, "
        "float tau, bool need_q, bool need_k) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mdp_cpu, CPU, m) {
  m.impl("pix_fwd", &pix_fwd);
  m.impl("pix_bwd", &pix_bwd);
}

}  // namespace mdp
