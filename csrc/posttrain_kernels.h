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

// GRPO advantages over rewards [batch, num_funcs] float32 (NaN = the reward function returned None), each group's
// num_generations completions contiguous: NaN-aware group means, Bessel-corrected std + std_eps, NaN -> 0. scale: 0
// none, 1 group, 2 batch; normalize_then_sum normalizes every function within its group first and the weighted sum
// over the batch. std_out (nullable) receives the std each advantage was (or would have been) divided by.
cudaError_t grpo_advantages(const float* rewards, int64_t batch, int64_t num_funcs, int64_t stride_b,
                            int64_t stride_r, const float* weights, int64_t num_generations, int scale,
                            bool normalize_then_sum, float std_eps, float* advantages, float* std_out,
                            cudaStream_t stream);

// Inputs of the GRPO loss kernels: contiguous float32 [batch, T] logps, old_logps, mask (and ref_logps, null when
// beta == 0; policy_weights, null for all ones: they multiply each token's policy term, not its KL term),
// advantages [batch], and GRPOConfig's options. loss_code: 0 clipped surrogate (grpo, bnpo, dr_grpo, dapo,
// luspo), 1 cispo, 2 sapo (vespo has no CUDA kernel). Tokens whose mask is 0 are skipped, whatever they hold.
struct GrpoLossInputs {
  const float* logps;
  const float* old_logps;
  const float* ref_logps;
  const float* advantages;
  const float* mask;
  const float* policy_weights;
  int64_t T;
  float beta, eps_low, eps_high, delta, sapo_temperature_pos, sapo_temperature_neg;
  int loss_code;
  bool sequence_level, bias_correction_kl, has_delta;
};

// Per-sequence sums [batch] of the per-token GRPO loss: loss (sum_t m_t loss_t), tokens, kl (when ref_logps), the
// clip counts, and at the sequence level coef (the ratio) and dcoef (sum_t m_t d loss_t / d ratio) for the backward.
cudaError_t grpo_loss_fwd(const GrpoLossInputs& in, int64_t batch, float* loss, float* tokens, float* kl,
                          float* clip_low, float* clip_high, float* clip_region, float* coef, float* dcoef,
                          cudaStream_t stream);

// dlogps [batch, T] float32 = d(sum_b grad_rows[b] * loss[b]) / d logps.
cudaError_t grpo_loss_bwd(const GrpoLossInputs& in, int64_t batch, const float* grad_rows, const float* tokens,
                          const float* coef, const float* dcoef, float* dlogps, cudaStream_t stream);

}  // namespace posttrain
