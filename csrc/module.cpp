// The Python module mdp_kernels._C. Importing it runs the static TORCH_LIBRARY registrations
// of every kernel file (each defines its own schemas with TORCH_LIBRARY_FRAGMENT): torch.ops.mdp_cpu.* (always) and torch.ops.mdp_cuda.* (CUDA builds).
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef MDP_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
