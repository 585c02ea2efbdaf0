// The schema of every kernel phase, defined once (namespace mdp_ext). Each backend file
// implements the phases it has with TORCH_LIBRARY_IMPL(mdp_ext, CPU | CUDA, m); the Python
// layer (mdp_kernels/extension.py) registers, per backend, the phases that have a kernel for
// its dispatch key. The contract these implement, and the argument names the Python side
// calls them with (keywords), are in mdp_kernels/dispatch.py (its docstring), checked against
// the registered schemas by tests/test_schemas.py.
#include <torch/library.h>

TORCH_LIBRARY(mdp_ext, m) {
  m.def("class_sums(Tensor feats, Tensor targets, int num_classes) -> (Tensor, Tensor)");
  m.def("class_sums_bwd(Tensor grad_sums, Tensor feats, Tensor targets) -> Tensor");
  m.def("ce_fwd(Tensor feats, Tensor protos, Tensor ta, Tensor? tb, Tensor? bias, Tensor? sw, "
        "float tau) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("ce_bwd(Tensor g_lse, Tensor g_za, Tensor? g_zb, Tensor? g_zq, Tensor feats, "
        "Tensor protos, Tensor ta, Tensor? tb, Tensor? bias, Tensor? sw, Tensor lse, float tau, "
        "bool need_feats, bool need_protos) -> (Tensor, Tensor)");
  m.def("ce_fwd_basis(Tensor feats, Tensor protos, Tensor ta, Tensor? tb, Tensor? bias, "
        "Tensor? sw, float tau) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("ce_bwd_basis(Tensor g_lse, Tensor g_za, Tensor? g_zb, Tensor? g_zq, Tensor E, "
        "Tensor feats, Tensor protos, Tensor ta, Tensor? tb, Tensor? sw, float tau) -> Tensor");
  m.def("ce_fwd_probs(Tensor feats, Tensor protos, Tensor ta, Tensor? tb, Tensor? bias, "
        "Tensor? sw, float tau) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("ce_bwd_probs(Tensor g_lse, Tensor g_za, Tensor? g_zb, Tensor? g_zq, Tensor S, "
        "Tensor feats, Tensor protos, Tensor ta, Tensor? tb, Tensor? sw, float tau, "
        "bool need_feats, bool need_protos) -> (Tensor, Tensor)");
  m.def("ce_fwd_grad(Tensor feats, Tensor protos, Tensor ta, Tensor? tb, Tensor? bias, "
        "Tensor? sw, Tensor c_lse, Tensor c_za, Tensor? c_zb, Tensor? c_zq, float tau, "
        "bool need_feats, bool need_protos) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("con_fwd(Tensor student, Tensor teacher, Tensor protos, Tensor? bias, Tensor? mask, "
        "float tau_s, float tau_t) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("con_bwd(Tensor g_ce, Tensor student, Tensor teacher, Tensor protos, Tensor? bias, "
        "Tensor? mask, Tensor lse_s, Tensor lse_t, float tau_s, float tau_t, "
        "bool need_feats, bool need_protos) -> (Tensor, Tensor)");
  m.def("con_fwd_basis(Tensor student, Tensor teacher, Tensor protos, Tensor? bias, "
        "Tensor? mask, float tau_s, float tau_t) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("con_bwd_basis(Tensor g_ce, Tensor G, Tensor student) -> Tensor");
  m.def("pix_fwd(Tensor q, Tensor k, Tensor qmask, Tensor kmask, float tau) -> Tensor");
  m.def("pix_bwd(Tensor g_lse, Tensor q, Tensor k, Tensor qmask, Tensor kmask, Tensor lse, "
        "float tau, bool need_q, bool need_k) -> (Tensor, Tensor)");
  m.def("pseudo_label(Tensor feats, Tensor protos, Tensor? bias, float threshold, "
        "int ignore_index) -> (Tensor, Tensor)");
  m.def("normalize_fwd(Tensor x, float eps) -> (Tensor, Tensor)");
  m.def("normalize_bwd(Tensor grad, Tensor y, Tensor norm, float eps) -> Tensor");
  m.def("bank_slot(Tensor sums, Tensor counts) -> (Tensor, Tensor)");
  m.def("bank_prototypes(Tensor sums, Tensor counts, bool normalize) -> (Tensor, Tensor)");
}
