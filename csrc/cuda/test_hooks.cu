// Test hooks of the CUDA kernels, registered as torch.ops.fopru_testing.* so that the fopru
// namespace keeps only the public ops (ops.py's SCHEMAS).
//
//   cuda_force_global_keys(bool enable) -> bool   sends every selection of the CUDA kernels
//       (select.cuh's callers) down the global-memory key path, which otherwise only inputs too
//       large for shared memory take; returns the previous setting. Process-wide.
//
// The launchers read the setting with one relaxed atomic load; an environment variable read on
// every launch (getenv is neither free nor safe against a concurrent setenv) would not do.
#include <torch/library.h>

#include <atomic>

namespace fopru {
namespace {

std::atomic<bool> g_force_global_keys{false};

bool set_force_global_keys(bool enable) { return g_force_global_keys.exchange(enable); }

}  // namespace

bool force_global_keys() { return g_force_global_keys.load(std::memory_order_relaxed); }

}  // namespace fopru

TORCH_LIBRARY(fopru_testing, m) {
  m.def("cuda_force_global_keys(bool enable) -> bool", &fopru::set_force_global_keys);
}
