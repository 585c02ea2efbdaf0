// Class sums / masked average pooling on CPU.
//
// Forward: sums[b, t_p, :] += f[b, :, p], counts[b, t_p] += 1 over pixels with t_p >= 0.
// Work is split over (image, channel block) pairs: each pair is owned by one task that walks
// the pixels of its image in order, so the result is identical for any thread count and
// needs no partial buffers or atomics. Channel blocks keep the inner loop short and the
// written rows of `sums` contiguous.
#include <torch/library.h>

#include "common.h"

namespace mdp {
namespace {

constexpr int64_t kChannelBlock = 16;

template <typename T>
void class_sums_kernel(const at::Tensor& feats, const int64_t* tgt, acc_t<T>* sums,
                       int64_t* counts, int64_t C) {
  using A = acc_t<T>;
  const int64_t B = feats.size(0), D = feats.size(1), P = feats.size(2);
  const int64_t sb = feats.stride(0), sd = feats.stride(1), sp = feats.stride(2);
  const T* f = feats.const_data_ptr<T>();
  const int64_t blocks = (D + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, d0 = (task % blocks) * kChannelBlock;
      const int64_t d1 = std::min(D, d0 + kChannelBlock);
      const int64_t* t = tgt + b * P;
      A* out = sums + b * C * D;
      const T* fb = f + b * sb;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t k = t[p];
        if (k < 0) continue;
        A* row = out + k * D;
        const T* src = fb + p * sp;
        for (int64_t d = d0; d < d1; ++d) row[d] += static_cast<A>(src[d * sd]);
      }
      if (d0 == 0) {
        int64_t* cnt = counts + b * C;
        for (int64_t p = 0; p < P; ++p)
          if (t[p] >= 0) ++cnt[t[p]];
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> class_sums(const at::Tensor& feats, const at::Tensor& targets,
                                              int64_t num_classes) {
  check_bdp(feats, "feats");
  check_targets(targets, feats.size(0), feats.size(2));
  const int64_t B = feats.size(0), D = feats.size(1);
  auto sums = at::zeros({B, num_classes, D}, feats.options().dtype(acc_scalar_type(feats.scalar_type())));
  auto counts = at::zeros({B, num_classes}, targets.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, feats.scalar_type(), "class_sums", [&] {
    class_sums_kernel<scalar_t>(feats, targets.const_data_ptr<int64_t>(),
                                sums.mutable_data_ptr<acc_t<scalar_t>>(),
                                counts.mutable_data_ptr<int64_t>(), num_classes);
  });
  return {sums, counts};
}

// Backward: dfeats[b, d, p] = grad_sums[b, t_p, d] (0 for t_p < 0), a gather.
at::Tensor class_sums_bwd(const at::Tensor& grad_sums, const at::Tensor& feats,
                          const at::Tensor& targets) {
  check_bdp(feats, "feats");
  const int64_t B = feats.size(0), D = feats.size(1), P = feats.size(2);
  check_targets(targets, B, P);
  const int64_t C = grad_sums.size(1);
  auto g = grad_sums.contiguous();
  auto out = at::empty({B, D, P}, feats.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, feats.scalar_type(), "class_sums_bwd", [&] {
    using A = acc_t<scalar_t>;
    const A* gp = g.const_data_ptr<A>();
    const int64_t* tp = targets.const_data_ptr<int64_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * D, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / D, d = task % D;
        const int64_t* t = tp + b * P;
        const A* gb = gp + b * C * D + d;
        scalar_t* o = op + task * P;
        for (int64_t p = 0; p < P; ++p)
          o[p] = t[p] < 0 ? scalar_t(0) : static_cast<scalar_t>(gb[t[p] * D]);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mdp_ext, CPU, m) {
  m.impl("class_sums", &class_sums);
  m.impl("class_sums_bwd", &class_sums_bwd);
}

}  // namespace mdp
