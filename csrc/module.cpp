// The Python module mdp_kernels._C. Importing it runs the static registrations: the schemas
// of torch.ops.mdp_ext.* (schema.cpp) and their CPU kernels (csrc/cpu), plus their CUDA
// kernels in CUDA builds (csrc/cuda).
#include <torch/extension.h>

#include "settings.h"

namespace mdp {
Settings& settings() {
  static Settings s;
  return s;
}
}  // namespace mdp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Checked by mdp_kernels.config before they get here.
  m.def("set_settings", [](int64_t cpu_tile_rows, int64_t cpu_pix_cols, bool deterministic) {
    auto& s = mdp::settings();
    s.cpu_tile_rows = cpu_tile_rows;
    s.cpu_pix_cols = cpu_pix_cols;
    s.deterministic = deterministic;
  });
#ifdef MDP_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
