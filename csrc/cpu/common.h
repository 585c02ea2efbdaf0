// Shared helpers of the CPU kernels.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "../acc.h"

namespace mdp {

inline void check_bdp(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 3, name, " must be (B, D, P), got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor");
}

inline void check_targets(const at::Tensor& t, int64_t b, int64_t p) {
  TORCH_CHECK(t.scalar_type() == at::kLong && t.is_contiguous() && t.dim() == 2 &&
                  t.size(0) == b && t.size(1) == p,
              "targets must be a contiguous int64 (B, P) tensor");
}

}  // namespace mdp
