// Prototype consistency CE / KL (con_fwd / con_bwd) on CPU, streamed over pixel chunks.
//
// Per chunk of kept pixels: Zs = S @ (P / tau_s)^T and Zt = T @ (P / tau_t)^T (BLAS, two
// L2-sized tiles); the student and teacher logsumexps and the cross term come from the same
// tiles. Masked classes get a bias of -1e30 instead of -inf so that t * log t and t * log s
// are exactly 0 there (exp underflows to 0) rather than NaN. The backward recomputes both
// tiles and forms dZs = g (softmax(Zs) - t) in place.
#include <torch/library.h>

#include "tiles.h"

namespace mdp {
namespace {

struct ConArgs {
  at::Tensor student, teacher, ps, pt, bias;  // ps = P / tau_s, pt = P / tau_t (acc)
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
    check_1d(*bias, C, at::kFloat, "bias");
    none = !at::isfinite(*bias).any().item<bool>();
  }
  const auto acc = acc_scalar_type(student.scalar_type());
  return {student, teacher, scaled_protos(protos, 1.0 / tau_s), scaled_protos(protos, 1.0 / tau_t),
          acc_bias(bias, acc, true), mp, B, student.size(1), P, C, none};
}

inline int64_t kept(const bool* mask, int64_t off, int64_t n, int64_t* idx) {
  int64_t nv = 0;
  for (int64_t i = 0; i < n; ++i)
    if (mask == nullptr || mask[off + i]) idx[nv++] = i;
  return nv;
}

// Scratch of one thread.
struct ConTiles {
  at::Tensor zs, zt, sbuf, tbuf, col;
  std::vector<int64_t> idx;
  ConTiles(int64_t rows, int64_t C, int64_t D, const at::TensorOptions& o)
      : zs(at::empty({rows, C}, o)), zt(at::empty({rows, C}, o)), sbuf(at::empty({rows, D}, o)),
        tbuf(at::empty({rows, D}, o)), col(at::empty({rows}, o)), idx(rows) {}
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
                    at::Tensor& lse_t) {
  using A = acc_t<T>;
  const Chunks ch(a.B, a.P, tile_rows(a.C));
  const at::Tensor pst = a.ps.t(), ptt = a.pt.t();
  A* out[4] = {ce.mutable_data_ptr<A>(), ent.mutable_data_ptr<A>(), lse_s.mutable_data_ptr<A>(),
               lse_t.mutable_data_ptr<A>()};
  for_parts(ch.count, num_parts(ch.count), [&](int64_t, int64_t g0, int64_t g1) {
    ConTiles w(ch.rows, a.C, a.D, ce.options());
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b = ch.image(g), p0 = ch.start(g), n = ch.size(g), off = b * a.P + p0;
      const int64_t nv = kept(a.mask, off, n, w.idx.data());
      if (nv == 0) continue;
      auto zs = w.zs.narrow(0, 0, nv), zt = w.zt.narrow(0, 0, nv);
      at::mm_out(zs, load_rows<T>(a.student, b, p0, n, w.idx.data(), nv, w.sbuf), pst);
      at::mm_out(zt, load_rows<T>(a.teacher, b, p0, n, w.idx.data(), nv, w.tbuf), ptt);
      if (a.bias.defined()) {
        zs.add_(a.bias);
        zt.add_(a.bias);
      }
      auto ls = log_softmax_(zs), lt = log_softmax_(zt);  // zs = log s, zt = log t
      auto t = at::exp(zt);
      auto c = (t * zs).sum({1}).neg_(), e = (t * zt).sum({1}).neg_();
      const at::Tensor vals[4] = {c, e, ls, lt};
      for (int k = 0; k < 4; ++k) {
        const A* v = vals[k].const_data_ptr<A>();
        for (int64_t i = 0; i < nv; ++i) out[k][off + w.idx[i]] = v[i];
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> con_fwd(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& protos,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& mask, double tau_s,
    double tau_t) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // inputs may require grad
  const ConArgs a = con_args(student, teacher, protos, bias, mask, tau_s, tau_t);
  const auto opts = student.options().dtype(acc_scalar_type(student.scalar_type()));
  at::Tensor o[4];
  for (auto& t : o) t = at::zeros({a.B, a.P}, opts);
  if (!a.none)
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "con_fwd",
                                    [&] { con_fwd_kernel<scalar_t>(a, o[0], o[1], o[2], o[3]); });
  return {o[0], o[1], o[2], o[3]};
}

template <typename T>
void con_bwd_kernel(const ConArgs& a, const at::Tensor& g_ce, const at::Tensor& lse_s,
                    const at::Tensor& lse_t, at::Tensor* dstudent, at::Tensor* dprotos) {
  using A = acc_t<T>;
  const Chunks ch(a.B, a.P, tile_rows(a.C));
  const at::Tensor pst = a.ps.t(), ptt = a.pt.t();
  const A* gp = g_ce.const_data_ptr<A>();
  const A* lsp = lse_s.const_data_ptr<A>();
  const A* ltp = lse_t.const_data_ptr<A>();
  const bool direct = dstudent && std::is_same<T, A>::value;
  const int64_t parts = num_parts(ch.count);
  std::vector<at::Tensor> dps(dprotos ? parts : 0);
  for_parts(ch.count, parts, [&](int64_t part, int64_t g0, int64_t g1) {
    ConTiles w(ch.rows, a.C, a.D, g_ce.options());
    auto dbuf = at::empty({ch.rows, a.D}, g_ce.options());
    at::Tensor dp;
    if (dprotos) dp = dps[part] = at::zeros({a.C, a.D}, g_ce.options());
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b = ch.image(g), p0 = ch.start(g), n = ch.size(g), off = b * a.P + p0;
      const int64_t* idx = w.idx.data();
      const int64_t nv = kept(a.mask, off, n, w.idx.data());
      if (nv == 0) {
        if (dstudent) store_rows<T>(*dstudent, b, p0, n, idx, 0, dbuf);
        continue;
      }
      auto f = load_rows<T>(a.student, b, p0, n, idx, nv, w.sbuf);
      auto zs = w.zs.narrow(0, 0, nv), zt = w.zt.narrow(0, 0, nv);
      at::mm_out(zs, f, pst);
      at::mm_out(zt, load_rows<T>(a.teacher, b, p0, n, idx, nv, w.tbuf), ptt);
      if (a.bias.defined()) {
        zs.add_(a.bias);
        zt.add_(a.bias);
      }
      // dzs = g (softmax(zs) - t)
      zs.sub_(gather_col(lsp + off, idx, nv, w.col)).exp_();
      zt.sub_(gather_col(ltp + off, idx, nv, w.col)).exp_();
      zs.sub_(zt).mul_(gather_col(gp + off, idx, nv, w.col));
      if (dstudent) {
        if (direct && nv == n) {
          auto o = out_rows(*dstudent, b, p0, n);
          at::mm_out(o, zs, a.ps);
        } else {
          auto d = dbuf.narrow(0, 0, nv);
          at::mm_out(d, zs, a.ps);
          store_rows<T>(*dstudent, b, p0, n, idx, nv, d);
        }
      }
      if (dprotos) dp.addmm_(zs.t(), f);
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(mdp_cpu, m) {
  m.def("con_fwd(Tensor student, Tensor teacher, Tensor protos, Tensor? bias, Tensor? mask, "
        "float tau_s, float tau_t) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("con_bwd(Tensor g_ce, Tensor student, Tensor teacher, Tensor protos, Tensor? bias, "
        "Tensor? mask, Tensor lse_s, Tensor lse_t, float tau_s, float tau_t, bool need_feats, "
        "bool need_protos) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mdp_cpu, CPU, m) {
  m.impl("con_fwd", &con_fwd);
  m.impl("con_bwd", &con_bwd);
}

}  // namespace mdp
