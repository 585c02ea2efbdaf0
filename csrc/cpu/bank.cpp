// Prototype-bank reductions (bank_slot / bank_prototypes) on CPU. They touch B x C x D or
// K x C x D numbers once, so plain ATen reductions are the whole kernel.
#include <torch/library.h>

#include "common.h"

namespace mdp {
namespace {

// S_j = sum_b [n_bj > 0] sums_bj / n_bj, n_j = sum_b [n_bj > 0].
std::tuple<at::Tensor, at::Tensor> bank_slot(const at::Tensor& sums, const at::Tensor& counts) {
  TORCH_CHECK(sums.dim() == 3 && counts.dim() == 2 && counts.size(0) == sums.size(0) &&
                  counts.size(1) == sums.size(1) && counts.scalar_type() == at::kLong &&
                  sums.is_floating_point(),
              "bank_slot takes sums (B, C, D) float and counts (B, C) int64, got ", sums.sizes(),
              " and ", counts.sizes(), " ", counts.scalar_type());
  const auto present = counts.gt(0);
  const auto means = sums / counts.clamp_min(1).unsqueeze(-1).to(sums.scalar_type());
  return {means.mul(present.unsqueeze(-1)).sum(0), present.sum(0).to(sums.scalar_type())};
}

// P_j = sum_s S_sj / sum_s n_sj (0 where no slot saw j), L2-normalised if `normalize`.
std::tuple<at::Tensor, at::Tensor> bank_prototypes(const at::Tensor& sums, const at::Tensor& counts,
                                                   bool normalize) {
  TORCH_CHECK(sums.dim() == 3 && counts.dim() == 2 && counts.size(0) == sums.size(0) &&
                  counts.size(1) == sums.size(1) && sums.is_floating_point(),
              "bank_prototypes takes sums (K, C, D) and counts (K, C), got ", sums.sizes(),
              " and ", counts.sizes());
  const auto n = counts.sum(0);
  const auto valid = n.gt(0);
  auto protos = sums.sum(0) / n.clamp_min(1).unsqueeze(-1).to(sums.scalar_type());
  if (normalize)  // as F.normalize: x / max(|x|, 1e-12)
    protos = protos / protos.norm(2, {1}, true).clamp_min(1e-12);
  return {protos.mul(valid.unsqueeze(-1)), valid};
}

}  // namespace

TORCH_LIBRARY_IMPL(mdp_ext, CPU, m) {
  m.impl("bank_slot", &bank_slot);
  m.impl("bank_prototypes", &bank_prototypes);
}

}  // namespace mdp
