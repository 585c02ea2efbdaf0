// The Python module mdp_kernels._C. Importing it runs the static registrations: the schemas
// of torch.ops.mdp_ext.* (schema.cpp) and their CPU kernels (csrc/cpu), plus their CUDA
// kernels in CUDA builds (csrc/cuda).
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef MDP_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
