// Pixel-to-prototype cross-entropy (ce_fwd / ce_bwd) on CPU, streamed over pixel chunks.
//
// z_ik = f_i . P_k / tau + bias_k (bias_bk with per-image class masks). Per chunk the kept pixels (ta >= 0 or tb >= 0) are
// compacted, Z = F_chunk @ (P / tau)^T goes through BLAS into an L2-sized tile, and the
// row reductions run on the tile. The backward recomputes the tile, turns it into dZ in
// place and does dF = dZ @ (P / tau) and dP += dZ^T @ F_chunk (then / tau).
//
// ce_fwd_basis also stores the softmax expectation E_i = sum_k softmax(z_i)_k P_k / tau
// (one more product per chunk, on the exp tile the forward already has; of the products'
// type, so bf16 for bf16 inputs, as the product's output is), so that
// ce_bwd_basis gets dF_i = g_lse_i E_i + g_za_i P_ta / tau + g_zb_i P_tb / tau in one
// O(N D) pass: 2 matrix products for a forward + feature backward instead of 3.
//
// ce_fwd_probs instead stores the softmax S (B, P, C), which for few classes is smaller than
// the features: ce_bwd_probs builds dZ from it and needs no logit recompute for dF or dP.
#include <torch/library.h>

#include "tiles.h"

namespace mdp {
namespace {

// Pixels of chunk [p0, p0 + n) of image b that have a target; returns their count.
inline int64_t kept(const int64_t* ta, const int64_t* tb, int64_t n, int64_t* idx) {
  int64_t nv = 0;
  for (int64_t i = 0; i < n; ++i)
    if (ta[i] >= 0 || (tb != nullptr && tb[i] >= 0)) idx[nv++] = i;
  return nv;
}

struct CeArgs {
  // ps = protos / tau (C, D) acc; pl = ps as the products' operand (rounded to the input
  // dtype for low precision, see tiles.h); bias (C,) / (B, C) acc, finite (-1e30 for -inf),
  // or undefined; sw the smoothing weights (C,) / (B, C) acc or undefined
  at::Tensor feats, ps, pl, bias, sw;
  const int64_t* ta;
  const int64_t* tb;
  int64_t B, D, P, C;
};

CeArgs ce_args(const at::Tensor& feats, const at::Tensor& protos, const at::Tensor& ta,
               const c10::optional<at::Tensor>& tb, const c10::optional<at::Tensor>& bias,
               const c10::optional<at::Tensor>& sw, double tau) {
  check_bdp(feats, "feats");
  check_protos(protos, feats);
  const int64_t B = feats.size(0), P = feats.size(2), C = protos.size(0);
  check_targets(ta, B, P);
  if (tb.has_value()) check_targets(*tb, B, P);
  if (bias.has_value()) check_bias(*bias, B, C);
  if (sw.has_value()) check_class_weights(*sw, B, C);
  const auto acc = acc_scalar_type(feats.scalar_type());
  const auto ps = scaled_protos(protos, 1.0 / tau);
  // finite bias: 0 * bias stays 0 in the smoothing term's sum over the masked classes
  return {feats, ps, operand_of(ps, feats.scalar_type()), acc_bias(bias, acc, true),
          acc_bias(sw, acc, false),
          ta.const_data_ptr<int64_t>(), tb.has_value() ? tb->const_data_ptr<int64_t>() : nullptr,
          B, feats.size(1), P, C};
}

// Chunk g of the pixel grid: where it lies, its targets, and how many pixels have one
// (their chunk offsets are written to idx).
struct CeChunk {
  int64_t b, p0, n, off;
  const int64_t* ta;
  const int64_t* tb;
  int64_t nv;
  CeChunk(const CeArgs& a, const Chunks& ch, int64_t g, int64_t* idx)
      : b(ch.image(g)), p0(ch.start(g)), n(ch.size(g)), off(b * a.P + p0), ta(a.ta + off),
        tb(a.tb ? a.tb + off : nullptr), nv(kept(ta, tb, n, idx)) {}
};

// dZ's target and smoothing terms, added to a chunk's kept rows holding the softmax part:
// + c_za [k = ta_i] + c_zb [k = tb_i] + c_zq_i sw_k (c_zb / c_zq null without tb / sw).
template <typename A>
void add_target_terms(const CeArgs& a, const CeChunk& c, const int64_t* idx, at::Tensor& z,
                      const A* c_za, const A* c_zb, const A* c_zq, at::Tensor& col) {
  A* zp = z.mutable_data_ptr<A>();
  for (int64_t i = 0; i < c.nv; ++i) {
    const int64_t p = idx[i];
    if (c.ta[p] >= 0) zp[i * a.C + c.ta[p]] += c_za[c.off + p];
    if (c.tb && c.tb[p] >= 0) zp[i * a.C + c.tb[p]] += c_zb[c.off + p];
  }
  if (c_zq) z.addr_(gather_col(c_zq + c.off, idx, c.nv, col).squeeze(1), bias_row(a.sw, c.b));
}

// Per-thread buffers: `tile` rows x C acc (logits, dZ); for low precision `low` rows x C of
// the input type (the product's output and dZ as the next product's operand); `buf` rows x D
// for gathered feature rows (row_options).
struct CeBufs {
  at::Tensor tile, low, buf;
  template <typename T>
  static CeBufs make(const CeArgs& a, int64_t rows, const at::TensorOptions& acc) {
    return {at::empty({rows, a.C}, acc),
            kLow<T> ? at::empty({rows, a.C}, row_options<T>(acc)) : at::Tensor(),
            at::empty({rows, a.D}, row_options<T>(acc))};
  }
};

// The kept pixels' features f (nv, D; the input type for low precision, else acc) and their
// logit tile z = f @ (P / tau)^T + bias (acc), in `dst` (tile, or S's rows).
template <typename T>
std::pair<at::Tensor, at::Tensor> chunk_logits(const CeArgs& a, const CeChunk& c,
                                               const int64_t* idx, at::Tensor& dst,
                                               CeBufs& w) {
  auto f = load_rows<T, prod_t<T>>(a.feats, c.b, c.p0, c.n, idx, c.nv, w.buf);
  auto z = dst.narrow(0, 0, c.nv);
  product_into<T>(z, f, a.pl.t(), w.low);
  if (a.bias.defined()) z.add_(bias_row(a.bias, c.b));
  return {f, z};
}

// Writes the nv tile rows to the chunk's rows off + idx[i] of S (N, C), zeros to the others.
template <typename A>
void store_probs(at::Tensor& S, int64_t off, int64_t n, const int64_t* idx, int64_t nv,
                 const at::Tensor& z) {
  const int64_t C = S.size(1);
  A* dst = S.mutable_data_ptr<A>() + off * C;
  const A* src = z.const_data_ptr<A>();
  for (int64_t i = 0, j = 0; i < n; ++i) {
    const bool keep = j < nv && idx[j] == i;
    for (int64_t k = 0; k < C; ++k) dst[i * C + k] = keep ? src[j * C + k] : A(0);
    j += keep;
  }
}

// The gradients of a loss linear in the statistics, L = sum_i c_lse_i lse_i + c_za_i za_i +
// c_zb_i zb_i + c_zq_i zq_i, computed by the forward from its hot logit tile (ce_fwd_grad).
template <typename A>
struct InForward {
  const A *c_lse, *c_za, *c_zb, *c_zq;  // c_zb / c_zq null without tb / sw
  at::Tensor* dfeats;                   // or null
  std::vector<at::Tensor>* dps;         // per-part dP (C, D) acc, or null
};

// basis: E (B, D, P) or null; probs: S (B, P, C) or null; grad: the in-forward gradients or
// null (at most one of the three).
template <typename T>
void ce_fwd_kernel(const CeArgs& a, at::Tensor& lse, at::Tensor& za, at::Tensor& zb,
                   at::Tensor& zq, at::Tensor* basis, at::Tensor* probs,
                   const InForward<acc_t<T>>* grad = nullptr) {
  using A = acc_t<T>;
  using R = prod_t<T>;
  const Chunks ch(a.B, a.P, tile_rows(a.C));
  const auto opts = lse.options();
  A* lse_p = lse.mutable_data_ptr<A>();
  A* za_p = za.mutable_data_ptr<A>();
  A* zb_p = zb.mutable_data_ptr<A>();
  A* zq_p = zq.mutable_data_ptr<A>();
  at::Tensor S = probs ? probs->view({a.B * a.P, a.C}) : at::Tensor();
  const int64_t parts = num_parts(ch.count);
  if (grad && grad->dps) grad->dps->resize(parts);
  for_parts(ch.count, parts, [&](int64_t part, int64_t g0, int64_t g1) {
    CeBufs w = CeBufs::make<T>(a, ch.rows, opts);
    const bool in_f = grad && grad->dfeats;
    at::Tensor ebuf = basis || in_f ? at::empty({ch.rows, a.D}, row_options<T>(opts))
                                    : at::Tensor();
    at::Tensor dp, dpl, col = at::empty({ch.rows}, opts), col2 = at::empty({ch.rows}, opts);
    if (grad && grad->dps) dp = (*grad->dps)[part] = at::zeros({a.C, a.D}, opts);
    if (dp.defined() && kLow<T>) dpl = at::empty({a.C, a.D}, row_options<T>(opts));
    std::vector<int64_t> idx(ch.rows);
    for (int64_t g = g0; g < g1; ++g) {
      const CeChunk c(a, ch, g, idx.data());
      const int64_t b = c.b, p0 = c.p0, n = c.n, off = c.off, nv = c.nv;
      const int64_t *ta = c.ta, *tb = c.tb;
      if (nv == 0) {
        if (basis) store_rows<R, R>(*basis, b, p0, n, idx.data(), 0, ebuf);
        if (probs) store_probs<A>(S, off, n, idx.data(), 0, w.tile);
        if (in_f) store_rows<T, R>(*grad->dfeats, b, p0, n, idx.data(), 0, ebuf);
        continue;
      }
      // all pixels kept: the logits go straight into S's rows and become the softmax there
      at::Tensor dst = probs && nv == n ? S.narrow(0, off, n) : w.tile;
      at::Tensor f, z;
      std::tie(f, z) = chunk_logits<T>(a, c, idx.data(), dst, w);
      const A* zp = z.const_data_ptr<A>();
      for (int64_t i = 0; i < nv; ++i) {
        const int64_t p = idx[i];
        if (ta[p] >= 0) za_p[off + p] = zp[i * a.C + ta[p]];
        if (tb && tb[p] >= 0) zb_p[off + p] = zp[i * a.C + tb[p]];
      }
      if (a.sw.defined()) {  // zq_i = sum_k sw_k z_ik, on the tile while it holds logits
        const at::Tensor q = at::mv(z, bias_row(a.sw, b));
        const A* qp = q.const_data_ptr<A>();
        for (int64_t i = 0; i < nv; ++i) zq_p[off + idx[i]] = qp[i];
      }
      auto m = at::amax(z, {1}, true);
      auto s = z.sub_(m).exp_().sum({1}, true);
      if (basis)  // E = (exp(z - m) @ P / tau) / s: the 1/s goes on the D-wide product
        store_product<R, R>(*basis, b, p0, n, idx.data(), nv, operand_of<T>(z, w.low), a.pl,
                            ebuf, s.reciprocal());
      if (probs) {
        z.div_(s);
        if (nv < n) store_probs<A>(S, off, n, idx.data(), nv, z);
      }
      if (grad) {  // dz = c_lse softmax + c_za [k = ta] + c_zb [k = tb] + c_zq sw, then dF, dP
        z.mul_(gather_col(grad->c_lse + off, idx.data(), nv, col).div_(s));
        add_target_terms<A>(a, c, idx.data(), z, grad->c_za, grad->c_zb, grad->c_zq, col2);
        const at::Tensor dz = operand_of<T>(z, w.low);
        if (in_f) store_product<T, R>(*grad->dfeats, b, p0, n, idx.data(), nv, dz, a.pl, ebuf);
        if (dp.defined()) add_mm<T>(dp, dz.t(), f, dpl);
      }
      const A* lp = s.log_().add_(m).const_data_ptr<A>();
      for (int64_t i = 0; i < nv; ++i) lse_p[off + idx[i]] = lp[i];
    }
  });
}

enum class Saved { kNone, kBasis, kProbs };

using FwdOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

FwdOut ce_fwd_impl(const at::Tensor& feats, const at::Tensor& protos, const at::Tensor& ta,
                   const c10::optional<at::Tensor>& tb, const c10::optional<at::Tensor>& bias,
                   const c10::optional<at::Tensor>& sw, double tau, Saved saved) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // inputs may require grad
  const CeArgs a = ce_args(feats, protos, ta, tb, bias, sw, tau);
  const auto opts = feats.options().dtype(acc_scalar_type(feats.scalar_type()));
  auto lse = at::zeros({a.B, a.P}, opts), za = at::zeros({a.B, a.P}, opts),
       zb = at::zeros({a.B, a.P}, opts), zq = at::zeros({a.B, a.P}, opts);
  at::Tensor e;
  if (saved == Saved::kBasis)  // laid out like feats, so the backward streams both alike
    e = at::empty_like(feats, at::MemoryFormat::Preserve);
  else if (saved == Saved::kProbs)
    e = at::empty({a.B, a.P, a.C}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, feats.scalar_type(), "ce_fwd", [&] {
    ce_fwd_kernel<scalar_t>(a, lse, za, zb, zq, saved == Saved::kBasis ? &e : nullptr,
                            saved == Saved::kProbs ? &e : nullptr);
  });
  return {lse, za, zb, zq, e};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ce_fwd(
    const at::Tensor& feats, const at::Tensor& protos, const at::Tensor& ta,
    const c10::optional<at::Tensor>& tb, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& sw, double tau) {
  auto [lse, za, zb, zq, e] = ce_fwd_impl(feats, protos, ta, tb, bias, sw, tau, Saved::kNone);
  return {lse, za, zb, zq};
}

FwdOut ce_fwd_basis(const at::Tensor& feats, const at::Tensor& protos, const at::Tensor& ta,
                    const c10::optional<at::Tensor>& tb, const c10::optional<at::Tensor>& bias,
                    const c10::optional<at::Tensor>& sw, double tau) {
  return ce_fwd_impl(feats, protos, ta, tb, bias, sw, tau, Saved::kBasis);
}

FwdOut ce_fwd_probs(const at::Tensor& feats, const at::Tensor& protos, const at::Tensor& ta,
                    const c10::optional<at::Tensor>& tb, const c10::optional<at::Tensor>& bias,
                    const c10::optional<at::Tensor>& sw, double tau) {
  return ce_fwd_impl(feats, protos, ta, tb, bias, sw, tau, Saved::kProbs);
}

// The forward statistics and, from the same logit tiles, the feature / prototype gradients
// of L = sum_i c_lse_i lse_i + c_za_i za_i + c_zb_i zb_i + c_zq_i zq_i (ce_fwd_grad).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ce_fwd_grad(
    const at::Tensor& feats, const at::Tensor& protos, const at::Tensor& ta,
    const c10::optional<at::Tensor>& tb, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& sw, const at::Tensor& c_lse, const at::Tensor& c_za,
    const c10::optional<at::Tensor>& c_zb, const c10::optional<at::Tensor>& c_zq, double tau,
    bool need_feats, bool need_protos) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // inputs may require grad
  const CeArgs a = ce_args(feats, protos, ta, tb, bias, sw, tau);
  const auto acc = acc_scalar_type(feats.scalar_type());
  const auto opts = feats.options().dtype(acc);
  const auto cl = c_lse.contiguous(), ca = c_za.contiguous();
  check_bp(cl, a.B, a.P, acc, "c_lse");
  check_bp(ca, a.B, a.P, acc, "c_za");
  TORCH_CHECK(c_zb.has_value() == tb.has_value(), "c_zb must be given exactly when tb is");
  TORCH_CHECK(c_zq.has_value() == sw.has_value(), "c_zq must be given exactly when sw is");
  at::Tensor cb, cq;
  if (c_zb.has_value()) check_bp(cb = c_zb->contiguous(), a.B, a.P, acc, "c_zb");
  if (c_zq.has_value()) check_bp(cq = c_zq->contiguous(), a.B, a.P, acc, "c_zq");
  auto lse = at::zeros({a.B, a.P}, opts), za = at::zeros({a.B, a.P}, opts),
       zb = at::zeros({a.B, a.P}, opts), zq = at::zeros({a.B, a.P}, opts);
  at::Tensor df, dp;
  if (need_feats) df = empty_like_bdp(feats);
  std::vector<at::Tensor> dps;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, feats.scalar_type(), "ce_fwd_grad",
                                  [&] {
    using A = acc_t<scalar_t>;
    const InForward<A> g{cl.const_data_ptr<A>(), ca.const_data_ptr<A>(),
                         cb.defined() ? cb.const_data_ptr<A>() : nullptr,
                         cq.defined() ? cq.const_data_ptr<A>() : nullptr,
                         need_feats ? &df : nullptr, need_protos ? &dps : nullptr};
    ce_fwd_kernel<scalar_t>(a, lse, za, zb, zq, nullptr, nullptr, &g);
  });
  if (need_protos) dp = reduce_parts(dps).mul_(1.0 / tau).to(protos.scalar_type());
  return {lse, za, zb, zq, df, dp};  // undefined (None) gradients when not needed
}

// dZ per chunk from the recomputed logits and lse, or (probs given) from the saved softmax.
template <typename T>
void ce_bwd_kernel(const CeArgs& a, const at::Tensor& g_lse, const at::Tensor& g_za,
                   const c10::optional<at::Tensor>& g_zb, const at::Tensor& g_zq,
                   const at::Tensor& lse, const at::Tensor* probs, at::Tensor* dfeats,
                   at::Tensor* dprotos) {
  using A = acc_t<T>;
  using R = prod_t<T>;
  const Chunks ch(a.B, a.P, tile_rows(a.C));
  const auto opts = g_lse.options();
  const A* gl = g_lse.const_data_ptr<A>();
  const A* ga = g_za.const_data_ptr<A>();
  const A* gb = g_zb.has_value() ? g_zb->const_data_ptr<A>() : nullptr;
  const A* gq = a.sw.defined() ? g_zq.const_data_ptr<A>() : nullptr;
  const A* lp = probs ? nullptr : lse.const_data_ptr<A>();
  const at::Tensor S = probs ? probs->view({a.B * a.P, a.C}) : at::Tensor();
  const int64_t parts = num_parts(ch.count);
  std::vector<at::Tensor> dps(dprotos ? parts : 0);
  for_parts(ch.count, parts, [&](int64_t part, int64_t g0, int64_t g1) {
    CeBufs w = CeBufs::make<T>(a, ch.rows, opts);
    auto dbuf = at::empty({ch.rows, a.D}, row_options<T>(opts)),
         col = at::empty({ch.rows}, opts), gcol = at::empty({ch.rows}, opts);
    at::Tensor dp, dpl;  // dP (acc), and for low precision one chunk's share in the input type
    if (dprotos) dp = dps[part] = at::zeros({a.C, a.D}, opts);
    if (dprotos && kLow<T>) dpl = at::empty({a.C, a.D}, row_options<T>(opts));
    auto idx_t = at::empty({ch.rows}, opts.dtype(at::kLong));
    int64_t* idx = idx_t.mutable_data_ptr<int64_t>();
    for (int64_t g = g0; g < g1; ++g) {
      const CeChunk c(a, ch, g, idx);
      const int64_t b = c.b, p0 = c.p0, n = c.n, off = c.off, nv = c.nv;
      const int64_t *ta = c.ta, *tb = c.tb;
      if (nv == 0) {
        if (dfeats) store_rows<T>(*dfeats, b, p0, n, idx, 0, dbuf);
        continue;
      }
      // dz = g_lse * softmax(z) + g_za [k = ta] + g_zb [k = tb]
      at::Tensor f, z;
      const at::Tensor gz = gather_col(gl + off, idx, nv, gcol);
      if (probs) {
        z = w.tile.narrow(0, 0, nv);
        if (nv == n) {
          at::mul_out(z, S.narrow(0, off, n), gz);
        } else {
          at::index_select_out(z, S.narrow(0, off, n), 0, idx_t.narrow(0, 0, nv));
          z.mul_(gz);
        }
        if (dprotos) f = load_rows<T, R>(a.feats, b, p0, n, idx, nv, w.buf);
      } else {
        std::tie(f, z) = chunk_logits<T>(a, c, idx, w.tile, w);
        z.sub_(gather_col(lp + off, idx, nv, col)).exp_().mul_(gz);
      }
      add_target_terms<A>(a, c, idx, z, ga, gb, gq, col);
      const at::Tensor dz = operand_of<T>(z, w.low);
      if (dfeats) store_product<T, R>(*dfeats, b, p0, n, idx, nv, dz, a.pl, dbuf);
      if (dprotos) add_mm<T>(dp, dz.t(), f, dpl);
    }
  });
  if (dprotos) *dprotos = reduce_parts(dps);
}

// g_zq contiguous when the smoothing weights are given (checked), else undefined.
at::Tensor check_g_zq(const c10::optional<at::Tensor>& g_zq, const c10::optional<at::Tensor>& sw,
                      int64_t B, int64_t P, at::ScalarType acc) {
  TORCH_CHECK(g_zq.has_value() == sw.has_value(), "g_zq must be given exactly when sw is");
  if (!g_zq.has_value()) return at::Tensor();
  auto g = g_zq->contiguous();
  check_bp(g, B, P, acc, "g_zq");
  return g;
}

// ce_bwd (lse given: the logits are recomputed) and ce_bwd_probs (the saved softmax S).
std::tuple<at::Tensor, at::Tensor> ce_bwd_impl(
    const at::Tensor& g_lse, const at::Tensor& g_za, const c10::optional<at::Tensor>& g_zb,
    const c10::optional<at::Tensor>& g_zq, const at::Tensor& feats, const at::Tensor& protos,
    const at::Tensor& ta, const c10::optional<at::Tensor>& tb,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& sw,
    const at::Tensor& lse, const at::Tensor* probs, double tau, bool need_feats,
    bool need_protos) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // inputs may require grad
  const CeArgs a = ce_args(feats, protos, ta, tb, bias, sw, tau);
  const auto acc = acc_scalar_type(feats.scalar_type());
  if (probs) {
    TORCH_CHECK(probs->dim() == 3 && probs->size(0) == a.B && probs->size(1) == a.P &&
                    probs->size(2) == a.C && probs->scalar_type() == acc &&
                    probs->is_contiguous(),
                "S must be a contiguous (B, P, C) tensor of the accumulation dtype, got ",
                probs->sizes(), " ", probs->scalar_type());
  } else {
    check_bp(lse, a.B, a.P, acc, "lse");
  }
  const auto gl = g_lse.contiguous(), ga = g_za.contiguous();
  check_bp(gl, a.B, a.P, acc, "g_lse");
  check_bp(ga, a.B, a.P, acc, "g_za");
  c10::optional<at::Tensor> gb;
  if (g_zb.has_value()) {
    gb = g_zb->contiguous();
    check_bp(*gb, a.B, a.P, acc, "g_zb");
  }
  TORCH_CHECK(gb.has_value() == tb.has_value(), "g_zb must be given exactly when tb is");
  const at::Tensor gq = check_g_zq(g_zq, sw, a.B, a.P, acc);
  at::Tensor df, dp;
  if (need_feats) df = empty_like_bdp(feats);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, feats.scalar_type(), "ce_bwd", [&] {
    ce_bwd_kernel<scalar_t>(a, gl, ga, gb, gq, probs ? lse : lse.contiguous(), probs,
                            need_feats ? &df : nullptr, need_protos ? &dp : nullptr);
  });
  if (need_protos) dp = dp.mul_(1.0 / tau).to(protos.scalar_type());
  return {df, dp};  // undefined (None) when not needed
}

std::tuple<at::Tensor, at::Tensor> ce_bwd(
    const at::Tensor& g_lse, const at::Tensor& g_za, const c10::optional<at::Tensor>& g_zb,
    const c10::optional<at::Tensor>& g_zq, const at::Tensor& feats, const at::Tensor& protos,
    const at::Tensor& ta, const c10::optional<at::Tensor>& tb,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& sw,
    const at::Tensor& lse, double tau, bool need_feats, bool need_protos) {
  return ce_bwd_impl(g_lse, g_za, g_zb, g_zq, feats, protos, ta, tb, bias, sw, lse, nullptr,
                     tau, need_feats, need_protos);
}

std::tuple<at::Tensor, at::Tensor> ce_bwd_probs(
    const at::Tensor& g_lse, const at::Tensor& g_za, const c10::optional<at::Tensor>& g_zb,
    const c10::optional<at::Tensor>& g_zq, const at::Tensor& S, const at::Tensor& feats,
    const at::Tensor& protos, const at::Tensor& ta, const c10::optional<at::Tensor>& tb,
    const c10::optional<at::Tensor>& sw, double tau, bool need_feats, bool need_protos) {
  return ce_bwd_impl(g_lse, g_za, g_zb, g_zq, feats, protos, ta, tb, c10::nullopt, sw,
                     at::Tensor(), &S, tau, need_feats, need_protos);
}


// dF = g_lse E + g_za P_ta / tau + g_zb P_tb / tau + g_zq Q / tau, 0 on skipped pixels
// (Q_b = sum_k sw_bk P_k, rows qs (1 or B, D), the smoothing term; zero without it). The
// scaled prototypes get a zero row C that absent targets point at, so the inner loops are
// branch-free; the loop order follows dF's layout ((B, D, P) or pixel-major).
template <typename T>
void ce_bwd_basis_kernel(const at::Tensor& g_lse, const at::Tensor& g_za, const at::Tensor* g_zb,
                         const at::Tensor& g_zq, const at::Tensor& e, const at::Tensor& ps,
                         const at::Tensor& qs, const int64_t* ta_all, const int64_t* tb_all,
                         at::Tensor& df) {
  using A = acc_t<T>;
  const int64_t B = df.size(0), D = df.size(1), P = df.size(2), C = ps.size(0) - 1;
  const Chunks ch(B, P, 256);
  const at::Tensor pst = ps.t().contiguous();  // (D, C + 1)
  const A* rows = ps.const_data_ptr<A>();
  const A* cols = pst.const_data_ptr<A>();
  const A* gl = g_lse.const_data_ptr<A>();
  const A* ga = g_za.const_data_ptr<A>();
  const A* gb = g_zb ? g_zb->const_data_ptr<A>() : nullptr;
  const A* gq = g_zq.defined() ? g_zq.const_data_ptr<A>() : nullptr;
  const int64_t sd = df.stride(1), sp = df.stride(2), ed = e.stride(1), ep = e.stride(2);
  for_parts(ch.count, num_parts(ch.count), [&](int64_t, int64_t g0, int64_t g1) {
    std::vector<A> cl(ch.rows), ca(ch.rows), cb(ch.rows), cq(ch.rows);
    std::vector<int64_t> ia(ch.rows), ib(ch.rows);
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b = ch.image(g), p0 = ch.start(g), n = ch.size(g), off = b * P + p0;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t a = ta_all[off + i], t = tb_all ? tb_all[off + i] : -1;
        cl[i] = (a >= 0 || t >= 0) ? gl[off + i] : A(0);
        ca[i] = a >= 0 ? ga[off + i] : A(0);
        cb[i] = t >= 0 ? gb[off + i] : A(0);
        cq[i] = (gq && (a >= 0 || t >= 0)) ? gq[off + i] : A(0);
        ia[i] = a >= 0 ? a : C;
        ib[i] = t >= 0 ? t : C;
      }
      T* dst = df.mutable_data_ptr<T>() + b * df.stride(0) + p0 * sp;
      const T* src = e.const_data_ptr<T>() + b * e.stride(0) + p0 * ep;
      const A* q = qs.const_data_ptr<A>() + (qs.size(0) > 1 ? b * D : 0);
      if (sp == 1) {
        for (int64_t d = 0; d < D; ++d) {
          const A* col = cols + d * (C + 1);
          for (int64_t i = 0; i < n; ++i)
            dst[d * sd + i] = static_cast<T>(cl[i] * static_cast<A>(src[d * ed + i * ep]) +
                                             ca[i] * col[ia[i]] + cb[i] * col[ib[i]] +
                                             cq[i] * q[d]);
        }
      } else {
        for (int64_t i = 0; i < n; ++i) {
          const A *ra = rows + ia[i] * D, *rb = rows + ib[i] * D;
          for (int64_t d = 0; d < D; ++d)
            dst[i * sp + d * sd] = static_cast<T>(cl[i] * static_cast<A>(src[d * ed + i * ep]) +
                                                  ca[i] * ra[d] + cb[i] * rb[d] + cq[i] * q[d]);
        }
      }
    }
  });
}

at::Tensor ce_bwd_basis(const at::Tensor& g_lse, const at::Tensor& g_za,
                        const c10::optional<at::Tensor>& g_zb,
                        const c10::optional<at::Tensor>& g_zq, const at::Tensor& e,
                        const at::Tensor& feats, const at::Tensor& protos, const at::Tensor& ta,
                        const c10::optional<at::Tensor>& tb, const c10::optional<at::Tensor>& sw,
                        double tau) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // inputs may require grad
  check_bdp(feats, "feats");
  check_protos(protos, feats);
  const int64_t B = feats.size(0), P = feats.size(2);
  check_targets(ta, B, P);
  if (tb.has_value()) check_targets(*tb, B, P);
  const auto acc = acc_scalar_type(feats.scalar_type());
  TORCH_CHECK(e.sizes() == feats.sizes() && e.scalar_type() == feats.scalar_type(),
              "E must be a (B, D, P) tensor of the features' dtype, got ", e.sizes(), " ",
              e.scalar_type());
  const auto gl = g_lse.contiguous(), ga = g_za.contiguous();
  check_bp(gl, B, P, acc, "g_lse");
  check_bp(ga, B, P, acc, "g_za");
  at::Tensor gb;
  if (g_zb.has_value()) {
    gb = g_zb->contiguous();
    check_bp(gb, B, P, acc, "g_zb");
  }
  TORCH_CHECK(gb.defined() == tb.has_value(), "g_zb must be given exactly when tb is");
  if (sw.has_value()) check_class_weights(*sw, B, protos.size(0));
  const at::Tensor gq = check_g_zq(g_zq, sw, B, P, acc);
  // P / tau with a zero row C for absent targets; Q / tau = sw @ P / tau (a zero row without)
  const auto scaled = scaled_protos(protos, 1.0 / tau);
  const auto ps = at::cat({scaled, at::zeros({1, feats.size(1)}, gl.options())});
  const auto qs = sw.has_value() ? at::mm(sw->to(acc).reshape({-1, protos.size(0)}), scaled)
                                 : at::zeros({1, feats.size(1)}, gl.options());
  auto df = empty_like_bdp(feats);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, feats.scalar_type(), "ce_bwd_basis",
                                  [&] {
    ce_bwd_basis_kernel<scalar_t>(gl, ga, gb.defined() ? &gb : nullptr, gq, e, ps, qs,
                                  ta.const_data_ptr<int64_t>(),
                                  tb.has_value() ? tb->const_data_ptr<int64_t>() : nullptr, df);
  });
  return df;
}

}  // namespace

TORCH_LIBRARY_IMPL(mdp_ext, CPU, m) {
  m.impl("ce_fwd", &ce_fwd);
  m.impl("ce_bwd", &ce_bwd);
  m.impl("ce_fwd_basis", &ce_fwd_basis);
  m.impl("ce_bwd_basis", &ce_bwd_basis);
  m.impl("ce_fwd_probs", &ce_fwd_probs);
  m.impl("ce_bwd_probs", &ce_bwd_probs);
  m.impl("ce_fwd_grad", &ce_fwd_grad);
}

}  // namespace mdp
