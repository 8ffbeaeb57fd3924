// Host launchers of posttrain's CUDA kernels: raw pointers, sizes, strides and a stream; no PyTorch types, so the
// kernels build with nvcc alone and the PyTorch binding (bindings.cpp) stays a thin argument-checking layer.
// Every launcher returns the cudaError_t of its launch.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace posttrain {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Per row of logits [n_rows, vocab] (row stride in elements, last stride 1): logprob = log softmax(z)[target],
// z = logits / temperature, entropy (when not null), and the logsumexp as row_max + log_sum (two numbers: at
// |z| ~ 1e3 their float sum would lose what the backward needs). Rows whose target is ignore_index get 0.
cudaError_t selective_log_softmax_fwd(DType dtype, const void* logits, int64_t n_rows, int64_t vocab,
                                      int64_t row_stride, const int64_t* targets, float temperature,
                                      int64_t ignore_index, float* logprob, float* entropy, float* row_max,
                                      float* log_sum, cudaStream_t stream);

// grad_logits = (1 / temperature) * (g_lp * (onehot(target) - p) - g_ent * p * (log p + entropy)), in the logits'
// dtype; grad_logprob / grad_entropy may be null (no gradient reached that output). Ignored rows get 0.
cudaError_t selective_log_softmax_bwd(DType dtype, const void* logits, int64_t n_rows, int64_t vocab,
                                      int64_t row_stride, const int64_t* targets, const float* row_max,
                                      const float* log_sum, const float* entropy, const float* grad_logprob,
                                      const float* grad_entropy, float temperature, int64_t ignore_index,
                                      void* grad_logits, int64_t grad_row_stride, cudaStream_t stream);

}  // namespace posttrain
