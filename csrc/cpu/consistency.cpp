// Prototype consistency CE / KL (con_fwd / con_bwd) on CPU, streamed over pixel chunks.
//
// Per chunk of kept pixels: Zs = S @ (P / tau_s)^T and Zt = T @ (P / tau_t)^T (BLAS, two
// L2-sized tiles); the student and teacher logsumexps and the cross term come from the same
// tiles. Masked classes get a bias of -1e30 instead of -inf so that t * log t and t * log s
// are exactly 0 there (exp underflows to 0) rather than NaN. The backward recomputes both
// tiles and forms dZs = g (softmax(Zs) - t) in place.
//
// con_fwd_basis also stores G_i = (softmax(z^s_i) - t_i) @ P / tau_s (one more product per
// chunk, on the tiles the forward already has), so that con_bwd_basis gets the student
// gradient dS_i = g_ce_i G_i in one O(N D) pass: 2 matrix products for a forward + student
// backward instead of 4.
#include <torch/library.h>

#include "tiles.h"

namespace mdp {
namespace {

struct ConArgs {
  // ps = P / tau_s, pt = P / tau_t, of the products' type (tiles.h: kLow); bias acc
  at::Tensor student, teacher, ps, pt, bias;
  const bool* mask;
  int64_t B, D, P, C;
  bool none;  // every class masked out: every pixel is skipped
};

ConArgs con_args(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& protos,
                 const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& mask,
                 double tau_s, double tau_t) {
  check_bdp(student, "student");
  check_bdp(teacher, "teacher");
  TORCH_CHECK(student.sizes() == teacher.sizes() &&
                  student.scalar_type() == teacher.scalar_type(),
              "student and teacher must have the same shape and dtype");
  check_protos(protos, student);
  const int64_t B = student.size(0), P = student.size(2), C = protos.size(0);
  const bool* mp = nullptr;
  if (mask.has_value()) {
    check_bp(*mask, B, P, at::kBool, "mask");
    TORCH_CHECK(mask->is_contiguous(), "mask must be contiguous");
    mp = mask->const_data_ptr<bool>();
  }
  bool none = false;
  if (bias.has_value()) {
    check_bias(*bias, B, C);
    none = !at::isfinite(*bias).any().item<bool>();
  }
  const auto acc = acc_scalar_type(student.scalar_type());
  const auto dt = student.scalar_type();
  return {student, teacher, operand_of(scaled_protos(protos, 1.0 / tau_s), dt),
          operand_of(scaled_protos(protos, 1.0 / tau_t), dt), acc_bias(bias, acc, true), mp, B,
          student.size(1), P, C, none};
}

inline int64_t kept(const bool* mask, int64_t off, int64_t n, int64_t* idx) {
  int64_t nv = 0;
  for (int64_t i = 0; i < n; ++i)
    if (mask == nullptr || mask[off + i]) idx[nv++] = i;
  return nv;
}

// Scratch of one thread: acc logit tiles, gathered rows of the products' type, and for low
// precision a rows x C tile of the input type (tiles.h: product_into, operand_of).
template <typename T>
struct ConTiles {
  at::Tensor zs, zt, sbuf, tbuf, col, low;
  std::vector<int64_t> idx;
  ConTiles(int64_t rows, int64_t C, int64_t D, const at::TensorOptions& o)
      : zs(at::empty({rows, C}, o)), zt(at::empty({rows, C}, o)),
        sbuf(at::empty({rows, D}, row_options<T>(o))),
        tbuf(at::empty({rows, D}, row_options<T>(o))), col(at::empty({rows}, o)),
        low(kLow<T> ? at::empty({rows, C}, row_options<T>(o)) : at::Tensor()), idx(rows) {}
};

// log-softmax of the teacher tile in place; returns its (nv, 1) logsumexp.
inline at::Tensor log_softmax_(at::Tensor& z) {
  auto m = at::amax(z, {1}, true);
  auto l = at::exp(z - m).sum({1}, true).log_().add_(m);
  z.sub_(l);
  return l;
}

template <typename T>
void con_fwd_kernel(const ConArgs& a, at::Tensor& ce, at::Tensor& ent, at::Tensor& lse_s,
                    at::Tensor& lse_t, at::Tensor* basis) {
  using A = acc_t<T>;
  using R = prod_t<T>;
  const Chunks ch(a.B, a.P, tile_rows(a.C));
  const at::Tensor pst = a.ps.t(), ptt = a.pt.t();
  A* out[4] = {ce.mutable_data_ptr<A>(), ent.mutable_data_ptr<A>(), lse_s.mutable_data_ptr<A>(),
               lse_t.mutable_data_ptr<A>()};
  for_parts(ch.count, num_parts(ch.count), [&](int64_t, int64_t g0, int64_t g1) {
    ConTiles<T> w(ch.rows, a.C, a.D, ce.options());
    at::Tensor gbuf =
        basis ? at::empty({ch.rows, a.D}, row_options<T>(ce.options())) : at::Tensor();
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b = ch.image(g), p0 = ch.start(g), n = ch.size(g), off = b * a.P + p0;
      const int64_t nv = kept(a.mask, off, n, w.idx.data());
      if (nv == 0) {
        if (basis) store_rows<R, R>(*basis, b, p0, n, w.idx.data(), 0, gbuf);
        continue;
      }
      auto zs = w.zs.narrow(0, 0, nv), zt = w.zt.narrow(0, 0, nv);
      product_into<T>(zs, load_rows<T, R>(a.student, b, p0, n, w.idx.data(), nv, w.sbuf), pst,
                      w.low);
      product_into<T>(zt, load_rows<T, R>(a.teacher, b, p0, n, w.idx.data(), nv, w.tbuf), ptt,
                      w.low);
      if (a.bias.defined()) {
        const auto row = bias_row(a.bias, b);
        zs.add_(row);
        zt.add_(row);
      }
      auto ls = log_softmax_(zs), lt = log_softmax_(zt);  // zs = log s, zt = log t
      auto t = at::exp(zt);
      auto c = (t * zs).sum({1}).neg_(), e = (t * zt).sum({1}).neg_();
      const at::Tensor vals[4] = {c, e, ls, lt};
      for (int k = 0; k < 4; ++k) {
        const A* v = vals[k].const_data_ptr<A>();
        for (int64_t i = 0; i < nv; ++i) out[k][off + w.idx[i]] = v[i];
      }
      if (basis) {  // G = (s - t) @ P / tau_s, with zs turned into s - t in place
        zs.exp_().sub_(t);
        store_product<R, R>(*basis, b, p0, n, w.idx.data(), nv, operand_of<T>(zs, w.low), a.ps,
                            gbuf);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> con_fwd_impl(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& protos,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& mask, double tau_s,
    double tau_t, bool with_basis) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // inputs may require grad
  const ConArgs a = con_args(student, teacher, protos, bias, mask, tau_s, tau_t);
  const auto opts = student.options().dtype(acc_scalar_type(student.scalar_type()));
  at::Tensor o[4];
  for (auto& t : o) t = at::zeros({a.B, a.P}, opts);
  at::Tensor gs;  // laid out like the student, so the backward pass streams both alike
  if (with_basis) gs = at::empty_like(student, at::MemoryFormat::Preserve);
  if (a.none) {
    if (with_basis) gs.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "con_fwd",
                                    [&] {
      con_fwd_kernel<scalar_t>(a, o[0], o[1], o[2], o[3], with_basis ? &gs : nullptr);
    });
  }
  return {o[0], o[1], o[2], o[3], gs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> con_fwd(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& protos,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& mask, double tau_s,
    double tau_t) {
  auto [ce, ent, ls, lt, gs] = con_fwd_impl(student, teacher, protos, bias, mask, tau_s, tau_t,
                                            false);
  return {ce, ent, ls, lt};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> con_fwd_basis(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& protos,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& mask, double tau_s,
    double tau_t) {
  return con_fwd_impl(student, teacher, protos, bias, mask, tau_s, tau_t, true);
}

template <typename T>
void con_bwd_kernel(const ConArgs& a, const at::Tensor& g_ce, const at::Tensor& lse_s,
                    const at::Tensor& lse_t, at::Tensor* dstudent, at::Tensor* dprotos) {
  using A = acc_t<T>;
  using R = prod_t<T>;
  const Chunks ch(a.B, a.P, tile_rows(a.C));
  const at::Tensor pst = a.ps.t(), ptt = a.pt.t();
  const A* gp = g_ce.const_data_ptr<A>();
  const A* lsp = lse_s.const_data_ptr<A>();
  const A* ltp = lse_t.const_data_ptr<A>();
  const int64_t parts = num_parts(ch.count);
  std::vector<at::Tensor> dps(dprotos ? parts : 0);
  for_parts(ch.count, parts, [&](int64_t part, int64_t g0, int64_t g1) {
    ConTiles<T> w(ch.rows, a.C, a.D, g_ce.options());
    auto dbuf = at::empty({ch.rows, a.D}, row_options<T>(g_ce.options()));
    at::Tensor dp, dpl;  // dP (acc), and for low precision one chunk's share in the input type
    if (dprotos) dp = dps[part] = at::zeros({a.C, a.D}, g_ce.options());
    if (dprotos && kLow<T>) dpl = at::empty({a.C, a.D}, row_options<T>(g_ce.options()));
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b = ch.image(g), p0 = ch.start(g), n = ch.size(g), off = b * a.P + p0;
      const int64_t* idx = w.idx.data();
      const int64_t nv = kept(a.mask, off, n, w.idx.data());
      if (nv == 0) {
        if (dstudent) store_rows<T>(*dstudent, b, p0, n, idx, 0, dbuf);
        continue;
      }
      auto f = load_rows<T, R>(a.student, b, p0, n, idx, nv, w.sbuf);
      auto zs = w.zs.narrow(0, 0, nv), zt = w.zt.narrow(0, 0, nv);
      product_into<T>(zs, f, pst, w.low);
      product_into<T>(zt, load_rows<T, R>(a.teacher, b, p0, n, idx, nv, w.tbuf), ptt, w.low);
      if (a.bias.defined()) {
        const auto row = bias_row(a.bias, b);
        zs.add_(row);
        zt.add_(row);
      }
      // dzs = g (softmax(zs) - t)
      zs.sub_(gather_col(lsp + off, idx, nv, w.col)).exp_();
      zt.sub_(gather_col(ltp + off, idx, nv, w.col)).exp_();
      zs.sub_(zt).mul_(gather_col(gp + off, idx, nv, w.col));
      const at::Tensor dz = operand_of<T>(zs, w.low);
      if (dstudent) store_product<T, R>(*dstudent, b, p0, n, idx, nv, dz, a.ps, dbuf);
      if (dprotos) add_mm<T>(dp, dz.t(), f, dpl);
    }
  });
  if (dprotos) *dprotos = reduce_parts(dps);
}

std::tuple<at::Tensor, at::Tensor> con_bwd(
    const at::Tensor& g_ce, const at::Tensor& student, const at::Tensor& teacher,
    const at::Tensor& protos, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& mask, const at::Tensor& lse_s, const at::Tensor& lse_t,
    double tau_s, double tau_t, bool need_feats, bool need_protos) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // inputs may require grad
  const ConArgs a = con_args(student, teacher, protos, bias, mask, tau_s, tau_t);
  const auto acc = acc_scalar_type(student.scalar_type());
  const auto g = g_ce.contiguous();
  check_bp(g, a.B, a.P, acc, "g_ce");
  check_bp(lse_s, a.B, a.P, acc, "lse_s");
  check_bp(lse_t, a.B, a.P, acc, "lse_t");
  at::Tensor ds, dp;
  if (need_feats) ds = empty_like_bdp(student);
  if (a.none) {
    if (need_feats) ds.zero_();
    if (need_protos) dp = at::zeros_like(protos);
    return {ds, dp};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "con_bwd", [&] {
    con_bwd_kernel<scalar_t>(a, g, lse_s.contiguous(), lse_t.contiguous(),
                             need_feats ? &ds : nullptr, need_protos ? &dp : nullptr);
  });
  if (need_protos) dp = dp.mul_(1.0 / tau_s).to(protos.scalar_type());
  return {ds, dp};
}

// dS = g_ce[:, None, :] * G; the loop order follows dS's layout ((B, D, P) or pixel-major).
template <typename T>
void con_bwd_basis_kernel(const at::Tensor& g_ce, const at::Tensor& gs, at::Tensor& ds) {
  using A = acc_t<T>;
  const int64_t B = ds.size(0), D = ds.size(1), P = ds.size(2);
  const Chunks ch(B, P, 256);
  const A* gp = g_ce.const_data_ptr<A>();
  const int64_t sd = ds.stride(1), sp = ds.stride(2), ed = gs.stride(1), ep = gs.stride(2);
  for_parts(ch.count, num_parts(ch.count), [&](int64_t, int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b = ch.image(g), p0 = ch.start(g), n = ch.size(g);
      const A* gc = gp + b * P + p0;
      T* dst = ds.mutable_data_ptr<T>() + b * ds.stride(0) + p0 * sp;
      const T* src = gs.const_data_ptr<T>() + b * gs.stride(0) + p0 * ep;
      if (sp == 1) {
        for (int64_t d = 0; d < D; ++d)
          for (int64_t i = 0; i < n; ++i)
            dst[d * sd + i] = static_cast<T>(gc[i] * static_cast<A>(src[d * ed + i * ep]));
      } else {
        for (int64_t i = 0; i < n; ++i)
          for (int64_t d = 0; d < D; ++d)
            dst[i * sp + d * sd] = static_cast<T>(gc[i] * static_cast<A>(src[d * ed + i * ep]));
      }
    }
  });
}

at::Tensor con_bwd_basis(const at::Tensor& g_ce, const at::Tensor& gs,
                         const at::Tensor& student) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // inputs may require grad
  check_bdp(student, "student");
  const auto acc = acc_scalar_type(student.scalar_type());
  TORCH_CHECK(gs.sizes() == student.sizes() && gs.scalar_type() == student.scalar_type(),
              "G must be a (B, D, P) tensor of the student's dtype, got ", gs.sizes(), " ",
              gs.scalar_type());
  const auto g = g_ce.contiguous();
  check_bp(g, student.size(0), student.size(2), acc, "g_ce");
  auto ds = empty_like_bdp(student);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(),
                                  "con_bwd_basis",
                                  [&] { con_bwd_basis_kernel<scalar_t>(g, gs, ds); });
  return ds;
}

}  // namespace

TORCH_LIBRARY_IMPL(mdp_ext, CPU, m) {
  m.impl("con_fwd", &con_fwd);
  m.impl("con_bwd", &con_bwd);
  m.impl("con_fwd_basis", &con_fwd_basis);
  m.impl("con_bwd_basis", &con_bwd_basis);
}

}  // namespace mdp
