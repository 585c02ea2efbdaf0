// The accumulation type of the cpu and cuda kernels: double for double, float for float /
// bf16 / half (layout.acc_dtype is the Python side).
#pragma once
#include <ATen/ATen.h>

namespace mdp {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

inline at::ScalarType acc_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace mdp
