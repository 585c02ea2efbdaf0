// Run-time settings of the C++ kernels, set from Python by mdp_kernels.config (the one
// configuration surface; environment variables only give its defaults there).
#pragma once
#include <atomic>
#include <cstdint>

namespace mdp {

struct Settings {
  std::atomic<int64_t> cpu_tile_rows{0};  // pixels per CPU chunk; 0: sized to the tile
  std::atomic<int64_t> cpu_pix_cols{0};   // key pixels per CPU pixel-loss block; 0: 512
  std::atomic<bool> deterministic{true};  // no float atomics (CUDA class sums)
};

Settings& settings();

}  // namespace mdp
