// Test-only stand-in for the header of the same name that CPU builds of PyTorch lack: just enough (the current
// stream) for a syntax and type check of csrc/bindings.cpp on a machine without CUDA PyTorch.
#pragma once
#include <cuda_runtime_api.h>

namespace at::cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream() { return {}; }
}  // namespace at::cuda
