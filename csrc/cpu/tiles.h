// Tile helpers shared by the streaming CPU kernels (CE, consistency, pixel-to-pixel,
// pseudo-labels).
//
// The kernels walk pixels in chunks of `rows` pixels of one image, so only a rows x C tile
// of logits exists at a time; the products run through BLAS (at::mm_out / addmm_) on tile
// views. Chunks are split into `parts` contiguous runs, one per thread; anything summed over
// chunks (dP) is summed per part in chunk order and the parts are then added in part order,
// so a run is reproducible for a given thread count.
#pragma once
#include <cstdlib>
#include <vector>

#include "../settings.h"
#include "common.h"

namespace mdp {

// Pixels per chunk for a tile with `cols` columns: about 512 KB of fp32 logits (L2-sized),
// or config.cpu_tile_rows when set (tests use it to check chunk-size invariance).
inline int64_t tile_rows(int64_t cols) {
  if (const int64_t v = settings().cpu_tile_rows.load()) return v;
  const int64_t r = (131072 / std::max<int64_t>(cols, 1)) / 16 * 16;
  return std::min<int64_t>(std::max<int64_t>(r, 16), 1024);
}

// Chunks of `rows` pixels over B images of P pixels each (chunks never cross images).
struct Chunks {
  int64_t P, rows, per_image, count;
  Chunks(int64_t B, int64_t P_, int64_t rows_)
      : P(P_), rows(rows_), per_image((P_ + rows_ - 1) / rows_), count(B * per_image) {}
  int64_t image(int64_t g) const { return g / per_image; }
  int64_t start(int64_t g) const { return (g % per_image) * rows; }
  int64_t size(int64_t g) const { return std::min(rows, P - start(g)); }
};

inline int64_t num_parts(int64_t chunks) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), chunks));
}

// fn(part, first, last) on `parts` contiguous ranges of [0, n), in parallel.
template <typename F>
void for_parts(int64_t n, int64_t parts, const F& fn) {
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: set it per worker
    for (int64_t q = begin; q < end; ++q) fn(q, n * q / parts, n * (q + 1) / parts);
  });
}

// Adds partials[1..] into partials[0] in order and returns it.
inline at::Tensor reduce_parts(std::vector<at::Tensor>& partials) {
  for (size_t q = 1; q < partials.size(); ++q) partials[0].add_(partials[q]);
  return partials[0];
}

// Low-precision inputs (bf16, fp16) multiply in their own dtype, as an eager bf16 matmul
// does (oneDNN: fp32 accumulation, the product rounded to the input dtype), at the
// hardware's bf16 rate; everything after the products (softmax statistics, dZ, sums over
// chunks) stays in the fp32 accumulation type.
template <typename T>
constexpr bool kLow = !std::is_same<T, acc_t<T>>::value;

// Options of a tile that holds rows of features of type T for the products: T itself for
// low precision, else the accumulation type.
template <typename T>
at::TensorOptions row_options(const at::TensorOptions& acc) {
  return kLow<T> ? acc.dtype(c10::CppTypeToScalarType<T>::value) : acc;
}

// x[b, :, p0 + idx[i]] for i < nv as an (nv, D) matrix of type O (x's accumulation type by
// default): a view when every pixel of the chunk is kept and no conversion is needed (BLAS
// reads the strides), else a gathered copy in `buf` (rows x D of O).
template <typename T, typename O = acc_t<T>>
at::Tensor load_rows(const at::Tensor& x, int64_t b, int64_t p0, int64_t n,
                     const int64_t* idx, int64_t nv, at::Tensor& buf) {
  if (nv == n && std::is_same<T, O>::value) return x.select(0, b).narrow(1, p0, n).t();
  const int64_t D = x.size(1), sd = x.stride(1), sp = x.stride(2);
  const T* src = x.const_data_ptr<T>() + b * x.stride(0) + p0 * sp;
  O* dst = buf.mutable_data_ptr<O>();
  if (sp == 1) {  // (B, D, P) layout: read each channel row once
    for (int64_t d = 0; d < D; ++d)
      for (int64_t i = 0; i < nv; ++i) dst[i * D + d] = static_cast<O>(src[d * sd + idx[i]]);
  } else {
    for (int64_t i = 0; i < nv; ++i)
      for (int64_t d = 0; d < D; ++d) dst[i * D + d] = static_cast<O>(src[idx[i] * sp + d * sd]);
  }
  return buf.narrow(0, 0, nv);
}

// out[b, :, p0 + i] for i < n as an (n, D) view.
inline at::Tensor out_rows(at::Tensor& out, int64_t b, int64_t p0, int64_t n) {
  return out.select(0, b).narrow(1, p0, n).t();
}

// Writes src (nv, D) rows of type S (out's accumulation type by default) to
// out[b, :, p0 + idx[i]] and zeros to the other pixels of the chunk [p0, p0 + n).
template <typename T, typename S = acc_t<T>>
void store_rows(at::Tensor& out, int64_t b, int64_t p0, int64_t n, const int64_t* idx,
                int64_t nv, const at::Tensor& src) {
  const int64_t D = out.size(1), sd = out.stride(1), sp = out.stride(2);
  T* dst = out.mutable_data_ptr<T>() + b * out.stride(0) + p0 * sp;
  const S* s = nv > 0 ? src.const_data_ptr<S>() : nullptr;
  const int64_t ss = nv > 0 ? src.stride(0) : 0;
  if (sp == 1) {  // (B, D, P) layout: write each channel row once, contiguously
    for (int64_t d = 0; d < D; ++d) {
      T* row = dst + d * sd;
      for (int64_t i = 0, j = 0; i < n; ++i) {
        const bool keep = j < nv && idx[j] == i;
        row[i] = keep ? static_cast<T>(s[j * ss + d]) : T(0);
        j += keep;
      }
    }
    return;
  }
  for (int64_t i = 0, j = 0; i < n; ++i) {
    const bool keep = j < nv && idx[j] == i;
    for (int64_t d = 0; d < D; ++d)
      dst[i * sp + d * sd] = keep ? static_cast<T>(s[j * ss + d]) : T(0);
    j += keep;
  }
}

// out[b, :, p0 + idx[i]] = (z @ ps)_i * row_scale_i for i < nv (row_scale (nv, 1) or
// undefined), 0 on the chunk's other pixels. The product has type S (z's and ps's, the
// accumulation type by default): it goes straight into out (of type T) when every pixel is
// kept and T is S, else through buf (rows x D of S), copied (converted) into out's rows.
template <typename T, typename S = acc_t<T>>
void store_product(at::Tensor& out, int64_t b, int64_t p0, int64_t n, const int64_t* idx,
                   int64_t nv, const at::Tensor& z, const at::Tensor& ps, at::Tensor& buf,
                   const at::Tensor& row_scale = at::Tensor()) {
  const bool direct = nv == n && std::is_same<T, S>::value;
  auto d = direct ? out_rows(out, b, p0, n) : buf.narrow(0, 0, nv);
  at::mm_out(d, z, ps);
  if (row_scale.defined()) d.mul_(row_scale);
  if (direct) return;
  if (nv == n) out_rows(out, b, p0, n).copy_(d);
  else store_rows<T, S>(out, b, p0, n, idx, nv, d);
}

// The products' type for inputs of type T (see kLow).
template <typename T>
using prod_t = std::conditional_t<kLow<T>, T, acc_t<T>>;

// An acc matrix (prototypes / tau) as the products' operand for inputs of dtype `input`:
// itself, or rounded to a low-precision input dtype (what an eager matmul multiplies).
inline at::Tensor operand_of(const at::Tensor& ps, at::ScalarType input) {
  return ps.scalar_type() == input ? ps : ps.to(input).contiguous();
}

// The acc tile z (nv, C) as the operand of the next product: itself, or rounded into `low`
// (rows x C of T).
template <typename T>
at::Tensor operand_of(const at::Tensor& z, at::Tensor& low) {
  return kLow<T> ? low.narrow(0, 0, z.size(0)).copy_(z) : z;
}

// out (nv, C) acc = f @ w, f and w of the products' type; for low precision the product
// lands in `low` (rows x C of T) first.
template <typename T>
void product_into(at::Tensor& out, const at::Tensor& f, const at::Tensor& w, at::Tensor& low) {
  if (kLow<T>) {
    auto zl = low.narrow(0, 0, out.size(0));
    at::mm_out(zl, f, w);
    out.copy_(zl);
  } else {
    at::mm_out(out, f, w);
  }
}

// acc (m, n) += a @ b (a and b of the products' type); for low precision through `part`
// (at least m x n of T, flat or 2-D), one tile's share rounded once.
template <typename T>
void add_mm(const at::Tensor& acc, const at::Tensor& a, const at::Tensor& b, at::Tensor& part) {
  if (kLow<T>) {
    auto pt = part.view(-1).narrow(0, 0, acc.numel()).view(acc.sizes());
    acc.add_(at::mm_out(pt, a, b));
  } else {
    acc.addmm_(a, b);
  }
}

// A (B, D, P)-shaped output laid out like x (so a strided input gets a gradient of the
// same layout and writing it chunk-wise is cache friendly).
inline at::Tensor empty_like_bdp(const at::Tensor& x) {
  return at::empty_like(x, at::MemoryFormat::Preserve);
}

// Prototypes (C, D) in the accumulation dtype, times `scale`, contiguous.
inline at::Tensor scaled_protos(const at::Tensor& protos, double scale) {
  auto p = protos.to(acc_scalar_type(protos.scalar_type())).mul(scale);
  return p.contiguous();
}

// Bias (C,) or (B, C) in the accumulation dtype, or undefined. `finite` replaces -inf by -1e30 so
// that 0 * bias stays 0 (exp(-1e30 - m) is exactly 0, so softmaxes are unchanged).
inline at::Tensor acc_bias(const c10::optional<at::Tensor>& bias, at::ScalarType acc,
                           bool finite) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  auto b = bias->to(acc).contiguous();
  if (finite) b = b.clamp_min(-1e30);
  return b;
}

// A class bias is float32 (C,) (every image) or (B, C) (one row per image: per-image class
// masks); the row that image b adds to its logits.
inline void check_bias(const at::Tensor& bias, int64_t B, int64_t C) {
  TORCH_CHECK(bias.scalar_type() == at::kFloat &&
                  ((bias.dim() == 1 && bias.size(0) == C) ||
                   (bias.dim() == 2 && bias.size(0) == B && bias.size(1) == C)),
              "bias must be a float32 (C,) or (B, C) tensor with B = ", B, ", C = ", C,
              ", got ", bias.sizes(), " ", bias.scalar_type());
}

// Label smoothing's class weights sw: a float32 / float64 (C,) or (B, C) like a bias.
inline void check_class_weights(const at::Tensor& sw, int64_t B, int64_t C) {
  TORCH_CHECK((sw.scalar_type() == at::kFloat || sw.scalar_type() == at::kDouble) &&
                  ((sw.dim() == 1 && sw.size(0) == C) ||
                   (sw.dim() == 2 && sw.size(0) == B && sw.size(1) == C)),
              "sw must be a float (C,) or (B, C) tensor with B = ", B, ", C = ", C, ", got ",
              sw.sizes(), " ", sw.scalar_type());
}

inline at::Tensor bias_row(const at::Tensor& bias, int64_t b) {
  return !bias.defined() || bias.dim() == 1 ? bias : bias.select(0, b);
}

inline void check_1d(const at::Tensor& t, int64_t n, at::ScalarType type, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.scalar_type() == type, name,
              " must be a (", n, ",) ", type, " tensor, got ", t.sizes(), " ", t.scalar_type());
}

inline void check_bp(const at::Tensor& t, int64_t b, int64_t p, at::ScalarType type,
                     const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == b && t.size(1) == p && t.scalar_type() == type,
              name, " must be a (", b, ", ", p, ") ", type, " tensor, got ", t.sizes(), " ",
              t.scalar_type());
}

inline void check_protos(const at::Tensor& protos, const at::Tensor& feats) {
  TORCH_CHECK(protos.dim() == 2 && protos.size(1) == feats.size(1) &&
                  protos.scalar_type() == feats.scalar_type(),
              "protos must be (C, D) of the features' dtype, got ", protos.sizes(), " ",
              protos.scalar_type());
}

// Column i of a gathered (nv,) per-row vector as an (nv, 1) tensor.
template <typename A>
at::Tensor gather_col(const A* src, const int64_t* idx, int64_t nv, at::Tensor& buf) {
  A* d = buf.mutable_data_ptr<A>();
  for (int64_t i = 0; i < nv; ++i) d[i] = src[idx[i]];
  return buf.narrow(0, 0, nv).unsqueeze(1);
}

}  // namespace mdp
