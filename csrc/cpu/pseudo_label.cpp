// Pseudo-labels (pseudo_label) on CPU: Z = F_chunk @ P^T (BLAS) on L2-sized tiles, then a
// row max / argmax that keeps the lowest index on ties (strict >).
#include <limits>

#include <torch/library.h>

#include "tiles.h"

namespace mdp {
namespace {

template <typename T>
void pseudo_kernel(const at::Tensor& feats, const at::Tensor& pt, const at::Tensor& bias,
                   double threshold, int64_t ignore_index, int64_t* labels, float* scores) {
  using A = acc_t<T>;
  const int64_t B = feats.size(0), D = feats.size(1), P = feats.size(2), C = pt.size(1);
  const Chunks ch(B, P, tile_rows(C));
  const auto opts = pt.options();
  std::vector<int64_t> all(ch.rows);
  for (int64_t i = 0; i < ch.rows; ++i) all[i] = i;
  for_parts(ch.count, num_parts(ch.count), [&](int64_t, int64_t g0, int64_t g1) {
    auto tile = at::empty({ch.rows, C}, opts), buf = at::empty({ch.rows, D}, opts);
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b = ch.image(g), p0 = ch.start(g), n = ch.size(g), off = b * P + p0;
      auto z = tile.narrow(0, 0, n);
      at::mm_out(z, load_rows<T>(feats, b, p0, n, all.data(), n, buf), pt);
      if (bias.defined()) z.add_(bias_row(bias, b));
      const A* zp = z.const_data_ptr<A>();
      for (int64_t i = 0; i < n; ++i) {
        const A* row = zp + i * C;
        A best = row[0];
        int64_t arg = 0;
        for (int64_t c = 1; c < C; ++c)
          if (row[c] > best) best = row[c], arg = c;
        scores[off + i] = static_cast<float>(best);
        labels[off + i] = best >= threshold ? arg : ignore_index;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> pseudo_label(const at::Tensor& feats, const at::Tensor& protos,
                                                const c10::optional<at::Tensor>& bias,
                                                double threshold, int64_t ignore_index) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // inputs may require grad
  check_bdp(feats, "feats");
  check_protos(protos, feats);
  const int64_t B = feats.size(0), P = feats.size(2), C = protos.size(0);
  if (bias.has_value()) check_bias(*bias, feats.size(0), C);
  const auto acc = acc_scalar_type(feats.scalar_type());
  const auto pt = scaled_protos(protos, 1.0).t();
  const auto b = acc_bias(bias, acc, false);
  auto labels = at::empty({B, P}, feats.options().dtype(at::kLong));
  auto scores = at::empty({B, P}, feats.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, feats.scalar_type(), "pseudo_label", [&] {
    pseudo_kernel<scalar_t>(feats, pt, b, threshold, ignore_index,
                            labels.mutable_data_ptr<int64_t>(), scores.mutable_data_ptr<float>());
  });
  return {labels, scores};
}

}  // namespace

TORCH_LIBRARY_IMPL(mdp_ext, CPU, m) { m.impl("pseudo_label", &pseudo_label); }

}  // namespace mdp
