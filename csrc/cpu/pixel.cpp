// Pixel-to-pixel logsumexp (pix_fwd / pix_bwd) on CPU, flash-attention style.
//
// Per image the valid keys are gathered once into Ks = K / tau, (nk, D). Queries are walked in
// blocks of `rows` pixels and keys in blocks of `cols` pixels (both by pixel position, invalid
// pixels compacted away inside a block), so only a rows x cols score tile (L2-sized) exists at
// a time and memory is O((P + Pk) D) per image, never P x Pk. The forward keeps an online
// logsumexp per query over the key blocks. The backward recomputes each tile from the saved
// lse: A = g * exp(S - lse), dQ_i += A Ks_j, dK_j += A^T Q_i (then / tau); all products are
// GEMMs with an inner dimension of D, rows or cols (never a thin rank-k update).
//
// Work is split over (image, query block) tasks, each owning its lse / dQ rows. dK_j sums over
// query blocks in block order, either inside one task per image (B >= threads) or inside one
// task per (image, key block) that recomputes its tiles (B < threads, so every core has work).
// Both orders are the same, so results do not depend on the thread count.
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

// Key pixels per block: 512, or config.cpu_pix_cols when set (tests check block invariance).
inline int64_t pix_cols() {
  const int64_t v = settings().cpu_pix_cols.load();
  return v ? v : 512;
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

// Shared state of one call: inputs, block sizes and each image's scaled valid keys.
template <typename T>
struct Pix {
  using A = acc_t<T>;
  at::Tensor q, k;
  const bool *qm, *km;
  double tau;
  int64_t B, D, P, Pk, rows, cols, qblocks, kblocks;
  at::TensorOptions opts;
  std::vector<at::Tensor> ks;               // per image: (nk, D) valid keys / tau
  std::vector<std::vector<int64_t>> koff;   // per image: first compact key of each key block

  Pix(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& qm_, const at::Tensor& km_,
      double tau_)
      : q(q_), k(k_), qm(qm_.const_data_ptr<bool>()), km(km_.const_data_ptr<bool>()),
        tau(tau_), B(q_.size(0)), D(q_.size(1)), P(q_.size(2)), Pk(k_.size(2)) {
    cols = std::min<int64_t>(pix_cols(), std::max<int64_t>(Pk, 1));
    rows = std::min<int64_t>(tile_rows(cols), std::max<int64_t>(P, 1));
    qblocks = (P + rows - 1) / rows;
    kblocks = (Pk + cols - 1) / cols;
    opts = q.options().dtype(acc_scalar_type(q.scalar_type()));
    ks.resize(B);
    koff.resize(B);
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::vector<int64_t> idx(Pk);
      for (int64_t b = begin; b < end; ++b) {
        auto& off = koff[b];
        off.assign(kblocks + 1, 0);
        for (int64_t j = 0; j < kblocks; ++j)
          off[j + 1] = off[j] + valid_idx(km + b * Pk + j * cols, kcount(j), idx.data());
        const int64_t nk = valid_idx(km + b * Pk, Pk, idx.data());
        if (nk == 0) continue;
        auto buf = at::empty({nk, D}, opts);
        ks[b] = operand_of(load_rows<T>(k, b, 0, Pk, idx.data(), nk, buf).mul(1.0 / tau),
                           q.scalar_type()).contiguous();
      }
    });
  }
  int64_t nk(int64_t b) const { return koff[b][kblocks]; }
  int64_t qcount(int64_t i) const { return std::min(rows, P - i * rows); }
  int64_t kcount(int64_t j) const { return std::min(cols, Pk - j * cols); }
  at::Tensor kblock(int64_t b, int64_t j) const {
    return ks[b].narrow(0, koff[b][j], koff[b][j + 1] - koff[b][j]);
  }
};

// Per-task scratch: the gathered query block (of the products' type, tiles.h: kLow), its
// score tile (acc), per-row vectors, and for low precision the score tile in the input type
// and a tile's share of dQ / dK (tiles.h: add_mm).
template <typename T>
struct Scratch {
  std::vector<int64_t> idx;
  at::Tensor qbuf, tile, col, col2, low, part;
  Scratch(const Pix<T>& x)
      : idx(std::max(x.rows, x.cols)), qbuf(at::empty({x.rows, x.D}, row_options<T>(x.opts))),
        tile(at::empty({x.rows * x.cols}, x.opts)), col(at::empty({x.rows}, x.opts)),
        col2(at::empty({x.rows}, x.opts)),
        low(kLow<T> ? at::empty({x.rows * x.cols}, row_options<T>(x.opts)) : at::Tensor()),
        part(kLow<T> ? at::empty({std::max(x.rows, x.cols) * x.D}, row_options<T>(x.opts))
                     : at::Tensor()) {}
  // Valid queries of block i of image b as (nv, D); nv == 0 when none.
  at::Tensor queries(const Pix<T>& x, int64_t b, int64_t i, int64_t& nv) {
    const int64_t p0 = i * x.rows, n = x.qcount(i);
    nv = valid_idx(x.qm + b * x.P + p0, n, idx.data());
    return nv ? load_rows<T, prod_t<T>>(x.q, b, p0, n, idx.data(), nv, qbuf) : at::Tensor();
  }
  // S = f Kj^T as a contiguous (nv, nkj) acc tile.
  at::Tensor scores(const at::Tensor& f, const at::Tensor& kj) {
    const int64_t m = f.size(0), c = kj.size(0);
    auto s = tile.narrow(0, 0, m * c).view({m, c});
    if (kLow<T>) {
      auto l = low.narrow(0, 0, m * c).view({m, c});
      s.copy_(at::mm_out(l, f, kj.t()));
    } else {
      at::mm_out(s, f, kj.t());
    }
    return s;
  }
  // An acc tile as the next product's operand (rounded into `low` for low precision).
  at::Tensor operand(const at::Tensor& a) {
    return kLow<T> ? low.narrow(0, 0, a.numel()).view(a.sizes()).copy_(a) : a;
  }
  // A = g * exp(S - lse) for the valid queries of block i (idx from queries()).
  at::Tensor probs(const Pix<T>& x, int64_t b, int64_t i, int64_t nv, const at::Tensor& f,
                   const at::Tensor& kj, const acc_t<T>* lse, const acc_t<T>* g) {
    const int64_t off = b * x.P + i * x.rows;
    auto s = scores(f, kj);
    s.sub_(gather_col(lse + off, idx.data(), nv, col)).exp_();
    return s.mul_(gather_col(g + off, idx.data(), nv, col2));
  }
};

// lse of query block i of image b, online over the key blocks.
template <typename T>
void fwd_block(const Pix<T>& x, Scratch<T>& w, int64_t b, int64_t i, acc_t<T>* lse) {
  using A = acc_t<T>;
  int64_t nv;
  const auto f = w.queries(x, b, i, nv);
  if (nv == 0 || x.nk(b) == 0) return;
  auto m = at::full({nv}, -std::numeric_limits<A>::infinity(), x.opts), sum = at::zeros({nv}, x.opts);
  for (int64_t j = 0; j < x.kblocks; ++j) {
    const auto kj = x.kblock(b, j);
    if (kj.size(0) == 0) continue;
    auto s = w.scores(f, kj);
    const auto mn = at::maximum(m, at::amax(s, {1}));
    sum.mul_(m.sub_(mn).exp_()).add_(s.sub_(mn.unsqueeze(1)).exp_().sum({1}));
    m = mn;
  }
  const A* l = sum.log_().add_(m).template const_data_ptr<A>();
  A* out = lse + b * x.P + i * x.rows;
  for (int64_t r = 0; r < nv; ++r) out[w.idx[r]] = l[r];
}

// dQ of query block i of image b (written to dq), and dK_j += A^T Q_i into dk (nk, D) if given.
template <typename T>
void bwd_qblock(const Pix<T>& x, Scratch<T>& w, int64_t b, int64_t i, const acc_t<T>* lse,
                const acc_t<T>* g, at::Tensor& dq, at::Tensor* dk, at::Tensor& dqbuf) {
  int64_t nv;
  const auto f = w.queries(x, b, i, nv);
  const int64_t p0 = i * x.rows, n = x.qcount(i);
  if (nv == 0 || x.nk(b) == 0) {
    if (dq.defined()) store_rows<T>(dq, b, p0, n, w.idx.data(), 0, dqbuf);
    return;
  }
  auto d = dqbuf.narrow(0, 0, nv);
  if (dq.defined()) d.zero_();
  for (int64_t j = 0; j < x.kblocks; ++j) {
    const auto kj = x.kblock(b, j);
    if (kj.size(0) == 0) continue;
    const auto a = w.operand(w.probs(x, b, i, nv, f, kj, lse, g));
    if (dq.defined()) add_mm<T>(d, a, kj, w.part);
    if (dk) add_mm<T>(dk->narrow(0, x.koff[b][j], kj.size(0)), a.t(), f, w.part);
  }
  if (dq.defined()) store_rows<T>(dq, b, p0, n, w.idx.data(), nv, d);
}

// dK of key block j of image b, recomputing its tiles over the query blocks in order.
template <typename T>
void bwd_kblock(const Pix<T>& x, Scratch<T>& w, int64_t b, int64_t j, const acc_t<T>* lse,
                const acc_t<T>* g, at::Tensor& dk, at::Tensor& dkbuf) {
  const auto kj = x.nk(b) ? x.kblock(b, j) : at::Tensor();
  const int64_t nkj = kj.defined() ? kj.size(0) : 0;
  auto acc = dkbuf.narrow(0, 0, nkj).zero_();
  for (int64_t i = 0; i < x.qblocks && nkj; ++i) {
    int64_t nv;
    const auto f = w.queries(x, b, i, nv);
    if (nv) add_mm<T>(acc, w.operand(w.probs(x, b, i, nv, f, kj, lse, g)).t(), f, w.part);
  }
  std::vector<int64_t> kidx(x.cols);
  const int64_t n = x.kcount(j);
  valid_idx(x.km + b * x.Pk + j * x.cols, n, kidx.data());
  store_rows<T>(dk, b, j * x.cols, n, kidx.data(), nkj, acc.mul_(1.0 / x.tau));
}

// fn(scratch, task) for tasks [0, n) in parallel, one scratch per worker.
template <typename T, typename F>
void for_tasks(const Pix<T>& x, int64_t n, const F& fn) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: set it per worker
    Scratch<T> w(x);
    for (int64_t t = begin; t < end; ++t) fn(w, t);
  });
}

at::Tensor pix_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& qmask,
                   const at::Tensor& kmask, double tau) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // inputs may require grad
  pix_check(q, k, qmask, kmask);
  const auto qm = qmask.contiguous(), km = kmask.contiguous();
  auto lse = at::zeros({q.size(0), q.size(2)}, q.options().dtype(acc_scalar_type(q.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "pix_fwd", [&] {
    const Pix<scalar_t> x(q, k, qm, km, tau);
    auto* out = lse.mutable_data_ptr<acc_t<scalar_t>>();
    for_tasks(x, x.B * x.qblocks, [&](Scratch<scalar_t>& w, int64_t t) {
      fwd_block(x, w, t / x.qblocks, t % x.qblocks, out);
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
  if (!need_q && !need_k) return {dq, dk};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "pix_bwd", [&] {
    using A = acc_t<scalar_t>;
    const Pix<scalar_t> x(q, k, qm, km, tau);
    const A *lp = l.const_data_ptr<A>(), *gp = g.const_data_ptr<A>();
    const bool per_image = need_k && x.B >= at::get_num_threads();
    if (per_image) {  // dQ and dK of a whole image per task
      for_tasks(x, x.B, [&](Scratch<scalar_t>& w, int64_t b) {
        auto dqbuf = at::empty({x.rows, x.D}, x.opts);
        auto dkacc = at::zeros({x.nk(b), x.D}, x.opts);
        for (int64_t i = 0; i < x.qblocks; ++i) bwd_qblock(x, w, b, i, lp, gp, dq, &dkacc, dqbuf);
        std::vector<int64_t> kidx(x.Pk);
        valid_idx(x.km + b * x.Pk, x.Pk, kidx.data());
        store_rows<scalar_t>(dk, b, 0, x.Pk, kidx.data(), x.nk(b), dkacc.mul_(1.0 / tau));
      });
      return;
    }
    if (need_q)
      for_tasks(x, x.B * x.qblocks, [&](Scratch<scalar_t>& w, int64_t t) {
        auto dqbuf = at::empty({x.rows, x.D}, x.opts);
        bwd_qblock(x, w, t / x.qblocks, t % x.qblocks, lp, gp, dq, nullptr, dqbuf);
      });
    if (need_k)
      for_tasks(x, x.B * x.kblocks, [&](Scratch<scalar_t>& w, int64_t t) {
        auto dkbuf = at::empty({x.cols, x.D}, x.opts);
        bwd_kblock(x, w, t / x.kblocks, t % x.kblocks, lp, gp, dk, dkbuf);
      });
  });
  return {dq, dk};
}

}  // namespace

TORCH_LIBRARY_IMPL(mdp_ext, CPU, m) {
  m.impl("pix_fwd", &pix_fwd);
  m.impl("pix_bwd", &pix_bwd);
}

}  // namespace mdp
