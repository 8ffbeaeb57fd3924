// GRPO in CUDA: group-normalized advantages (one launch, NaN-aware) and the per-sequence sums of the per-token
// clipped policy loss, forward and backward. The math is kernels/grpo.py's (TRL 1.16's GRPOTrainer), operand for
// operand; the loss-type-specific aggregation of the [B] sums stays in torch. Masked-out tokens are skipped, never
// multiplied by a 0 mask: whatever they hold (NaN, inf) cannot reach a sum or a gradient.
#include <cmath>

#include "common.cuh"
#include "posttrain_kernels.h"

namespace posttrain {
namespace {

constexpr int kWarp = 32;
constexpr int kAdvThreads = 256;
constexpr int kLossThreads = 256;

__device__ __forceinline__ bool is_nan(float x) { return x != x; }

// ---------------------------------------------------------------------------------------------------------------
// Advantages. A warp owns a group: its lanes stride over the group's completions and reduce with shuffles. The
// per-completion rewards are recomputed whenever needed rather than staged (R is small; rewards are read from L2).

struct GroupSums {
  float sum, count;
};

__device__ __forceinline__ GroupSums warp_sums(GroupSums s) {
  return {warp_sum(s.sum), warp_sum(s.count)};
}

// NaN-aware mean and Bessel-corrected std of f(i) over the `n` completions of a warp's group (NaN without data; std
// NaN for a single value), in every lane.
template <typename F>
__device__ void group_mean_std(F f, int n, int lane, float& mean, float& std) {
  GroupSums s{0.f, 0.f};
  for (int i = lane; i < n; i += kWarp) {
    const float x = f(i);
    if (!is_nan(x)) s.sum += x, s.count += 1.f;
  }
  s = warp_sums(s);
  mean = s.sum / s.count;
  float var = 0.f;
  for (int i = lane; i < n; i += kWarp) {
    const float x = f(i);
    if (!is_nan(x)) var += (x - mean) * (x - mean);
  }
  var = warp_sum(var);
  std = s.count > 1.f ? sqrtf(var / (s.count - 1.f)) : NAN;
}

struct AdvantageArgs {
  const float* rewards;  // [B, R]
  int64_t stride_b, stride_r;
  const float* weights;  // [R]
  int64_t num_groups, group_size, num_funcs;
  float std_eps;  // added to every std before dividing (posttrain.ops.grpo_advantages.STD_EPS)
};

// The combined reward of completion `i` of group `g`: the weighted NaN-ignoring sum over reward functions (each
// normalized within the group first with kNormalizeFirst), NaN when every function returned None.
template <bool kNormalizeFirst>
__device__ float combined_reward(const AdvantageArgs& a, int64_t g, int i, int lane) {
  const float* row = a.rewards + (g * a.group_size + i) * a.stride_b;
  bool scorable = false;
  float total = 0.f;
  for (int64_t k = 0; k < a.num_funcs; ++k) {
    float x = row[k * a.stride_r];
    scorable |= !is_nan(x);
    if (kNormalizeFirst) {
      // Every lane computes the same per-function statistics; lanes past the group reach here too (i is clamped)
      float mean, std;
      const float* col = a.rewards + g * a.group_size * a.stride_b + k * a.stride_r;
      group_mean_std([=](int j) { return col[j * a.stride_b]; }, static_cast<int>(a.group_size), lane, mean, std);
      x = (x - mean) / (std + a.std_eps);
    }
    const float weighted = x * a.weights[k];
    if (!is_nan(weighted)) total += weighted;
  }
  return scorable ? total : NAN;
}

__device__ __forceinline__ float nan_to_num(float x) {
  if (is_nan(x)) return 0.f;
  return fminf(fmaxf(x, -3.4028234663852886e38f), 3.4028234663852886e38f);
}

template <bool kNormalizeFirst>
__device__ void batch_mean_std(const AdvantageArgs& a, float& mean, float& std) {
  // Two passes over the whole batch (a one-pass sum of squares cancels badly for rewards ~1e3), by one block
  __shared__ float partial[kAdvThreads / kWarp][2];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
  const int n = static_cast<int>(a.group_size);
  for (int pass = 0; pass < 2; ++pass) {
    float acc = 0.f, count = 0.f;
    for (int64_t g = warp; g < a.num_groups; g += warps) {
      for (int base = 0; base < n; base += kWarp) {
        const int i = base + lane;
        const float r = combined_reward<kNormalizeFirst>(a, g, i < n ? i : n - 1, lane);
        if (i < n && !is_nan(r)) {
          acc += pass == 0 ? r : (r - mean) * (r - mean);
          count += 1.f;
        }
      }
    }
    acc = warp_sum(acc), count = warp_sum(count);
    if (lane == 0) partial[warp][0] = acc, partial[warp][1] = count;
    __syncthreads();
    float total = 0.f, total_count = 0.f;
    for (int w = 0; w < warps; ++w) total += partial[w][0], total_count += partial[w][1];
    __syncthreads();
    if (pass == 0) {
      mean = total / total_count;
    } else {
      std = total_count > 1.f ? sqrtf(total / (total_count - 1.f)) : NAN;
    }
  }
}

// kScale: 0 none, 1 group, 2 batch. kBatchStats: a single block computes the batch statistics first.
template <bool kNormalizeFirst, int kScale, bool kBatchStats>
__global__ void __launch_bounds__(kAdvThreads) grpo_advantages_kernel(AdvantageArgs a, float* advantages, float* std_out) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
  float batch_mean = 0.f, batch_std = 0.f;
  if (kBatchStats) batch_mean_std<kNormalizeFirst>(a, batch_mean, batch_std);
  const int n = static_cast<int>(a.group_size);
  const int64_t first = kBatchStats ? warp : static_cast<int64_t>(blockIdx.x) * warps + warp;
  const int64_t step = kBatchStats ? warps : static_cast<int64_t>(gridDim.x) * warps;
  for (int64_t g = first; g < a.num_groups; g += step) {
    // lanes past the group size evaluate a clamped index: their value is never written, and the NaN-aware
    // statistics below only read indices < n
    auto reward = [=](int i) { return combined_reward<kNormalizeFirst>(a, g, i < n ? i : n - 1, lane); };
    float group_mean = 0.f, group_std = 0.f;
    if (!kNormalizeFirst) group_mean_std(reward, n, lane, group_mean, group_std);
    for (int base = 0; base < n; base += kWarp) {
      const int i = base + lane;
      const float r = reward(i);
      float adv, std;
      if (kNormalizeFirst) {
        adv = (r - batch_mean) / (batch_std + a.std_eps), std = batch_std;
      } else if (kScale == 1) {
        adv = (r - group_mean) / (group_std + a.std_eps), std = group_std;
      } else if (kScale == 2) {
        adv = (r - group_mean) / (batch_std + a.std_eps), std = batch_std;
      } else {
        adv = r - group_mean, std = group_std;
      }
      if (i < n) {
        advantages[g * n + i] = nan_to_num(adv);
        if (std_out != nullptr) std_out[g * n + i] = std;
      }
    }
  }
}

template <bool kNormalizeFirst, int kScale, bool kBatchStats>
cudaError_t launch_advantages(const AdvantageArgs& a, float* advantages, float* std_out, cudaStream_t stream) {
  const int64_t warps = kAdvThreads / kWarp;
  const int64_t blocks = kBatchStats ? 1 : std::min<int64_t>((a.num_groups + warps - 1) / warps, 65535);
  grpo_advantages_kernel<kNormalizeFirst, kScale, kBatchStats>
      <<<static_cast<unsigned>(blocks), kAdvThreads, 0, stream>>>(a, advantages, std_out);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------------------------
// Loss. One block per sequence; threads stride over its tokens and the per-row sums are block-reduced.

struct LossArgs {
  const float *logps, *old_logps, *ref_logps, *advantages, *mask, *weights;  // [B, T] contiguous (advantages [B])
  int64_t T;
  float beta, eps_low, eps_high, delta, t_pos, t_neg;
  int loss_code;  // 0 clipped surrogate (grpo, bnpo, dr_grpo, dapo, luspo), 1 cispo, 2 sapo
  bool sequence_level, has_kl, bias_kl, has_delta;
};

struct PolicyTerm {
  float loss, grad;  // grad: d loss / d logp for cispo (ratio detached), d loss / d ratio otherwise
};

__device__ __forceinline__ PolicyTerm policy_term(const LossArgs& a, float c, float adv, float logp) {
  if (a.loss_code == 1) {
    const float w = fminf(c, a.eps_high);
    return {-w * adv * logp, -w * adv};
  }
  if (a.loss_code == 2) {
    const float temp = adv > 0.f ? a.t_pos : a.t_neg;
    const float gate = 1.f / (1.f + expf(-temp * (c - 1.f)));
    return {-gate * (4.f / temp) * adv, -4.f * adv * gate * (1.f - gate)};
  }
  const float lo = 1.f - a.eps_low, hi = 1.f + a.eps_high;
  float c1 = c, d1 = 1.f;
  if (a.has_delta) {
    d1 = c <= a.delta ? 1.f : 0.f;  // as torch.clamp(max=delta): the gradient passes at c == delta
    c1 = fminf(c, a.delta);
  }
  const float c2 = fminf(fmaxf(c, lo), hi);
  const float d2 = (c >= lo && c <= hi) ? 1.f : 0.f;
  const float x = c1 * adv, y = c2 * adv;
  // torch.minimum sends half the gradient to each side on a tie
  const float d = x < y ? d1 : (x > y ? d2 : 0.5f * (d1 + d2));
  return {-fminf(x, y), -adv * d};
}

__device__ __forceinline__ void clip_flags(const LossArgs& a, float c, float adv, float& low, float& high) {
  if (a.loss_code == 1) {
    low = 0.f;
    high = (adv > 0.f && c > a.eps_high) ? 1.f : 0.f;
    return;
  }
  const float c1 = (a.loss_code == 0 && a.has_delta) ? fminf(c, a.delta) : c;
  low = (adv < 0.f && c1 < 1.f - a.eps_low) ? 1.f : 0.f;
  high = (adv > 0.f && c1 > 1.f + a.eps_high) ? 1.f : 0.f;
}

template <int K>
__device__ void block_sums(float (&v)[K]) {
  __shared__ float partial[K][kLossThreads / kWarp];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    v[k] = warp_sum(v[k]);
    if (lane == 0) partial[k][warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    float total = 0.f;
    for (int w = 0; w < kLossThreads / kWarp; ++w) total += partial[k][w];
    v[k] = total;
  }
  __syncthreads();
}

// The sequence-level importance ratio exp(sum_t m_t (logp_t - old_t) / max(sum_t m_t, 1)) and sum_t m_t.
__device__ void sequence_ratio(const LossArgs& a, int64_t row, float& ratio, float& tokens) {
  float v[2] = {0.f, 0.f};
  for (int64_t t = threadIdx.x; t < a.T; t += kLossThreads) {
    const int64_t i = row * a.T + t;
    const float m = a.mask[i];
    if (m == 0.f) continue;
    v[0] += m * (a.logps[i] - a.old_logps[i]);
    v[1] += m;
  }
  block_sums(v);
  tokens = v[1];
  ratio = expf(v[0] / fmaxf(tokens, 1.f));
}

__global__ void __launch_bounds__(kLossThreads) grpo_loss_fwd_kernel(LossArgs a, float* loss, float* tokens, float* kl,
                                                                      float* clip_low, float* clip_high,
                                                                      float* clip_region, float* coef, float* dcoef) {
  const int64_t row = blockIdx.x;
  const float adv = a.advantages[row];
  float c_seq = 1.f, seq_tokens = 0.f;
  if (a.sequence_level) sequence_ratio(a, row, c_seq, seq_tokens);
  enum { kLoss, kKl, kTokens, kLow, kHigh, kRegion, kDcoef, kCount };
  float v[kCount] = {};
  for (int64_t t = threadIdx.x; t < a.T; t += kLossThreads) {
    const int64_t i = row * a.T + t;
    const float m = a.mask[i];
    if (m == 0.f) continue;
    const float logp = a.logps[i];
    const float c = a.sequence_level ? c_seq : expf(logp - a.old_logps[i]);
    PolicyTerm term = policy_term(a, c, adv, logp);
    if (a.weights != nullptr) term.loss *= a.weights[i], term.grad *= a.weights[i];
    if (a.sequence_level && a.loss_code != 1) v[kDcoef] += term.grad * m;
    if (a.has_kl) {
      const float d = a.ref_logps[i] - logp;
      float k3 = expf(d) - d - 1.f;
      if (a.bias_kl) {
        if (a.sequence_level) v[kDcoef] += a.beta * k3 * m;
        k3 *= c;
      }
      term.loss += a.beta * k3;
      v[kKl] += k3 * m;
    }
    v[kLoss] += term.loss * m;
    if (!a.sequence_level) {
      float low, high;
      clip_flags(a, c, adv, low, high);
      v[kTokens] += m, v[kLow] += low * m, v[kHigh] += high * m, v[kRegion] += fmaxf(low, high) * m;
    }
  }
  block_sums(v);
  if (threadIdx.x != 0) return;
  loss[row] = v[kLoss];
  if (a.has_kl) kl[row] = v[kKl];
  if (a.sequence_level) {
    // one ratio per sequence, hence one clip decision per sequence
    float low, high;
    clip_flags(a, c_seq, adv, low, high);
    tokens[row] = seq_tokens, clip_low[row] = low, clip_high[row] = high, clip_region[row] = fmaxf(low, high);
    coef[row] = c_seq, dcoef[row] = v[kDcoef];
  } else {
    tokens[row] = v[kTokens], clip_low[row] = v[kLow], clip_high[row] = v[kHigh], clip_region[row] = v[kRegion];
  }
}

__global__ void __launch_bounds__(kLossThreads)
    grpo_loss_bwd_kernel(LossArgs a, const float* grad_rows, const float* tokens, const float* coef,
                         const float* dcoef, float* dlogps) {
  const int64_t row = blockIdx.x;
  const float adv = a.advantages[row], g_row = grad_rows[row];
  float c_seq = 1.f, coupling = 0.f;
  if (a.sequence_level) {
    // every token's loss depends on the sequence ratio through sum_t m_t logp_t / max(sum_t m_t, 1)
    c_seq = coef[row];
    coupling = c_seq * dcoef[row] / fmaxf(tokens[row], 1.f);
  }
  for (int64_t t = threadIdx.x; t < a.T; t += kLossThreads) {
    const int64_t i = row * a.T + t;
    const float m = a.mask[i];
    if (m == 0.f) {
      dlogps[i] = 0.f;
      continue;
    }
    const float logp = a.logps[i];
    const float c = a.sequence_level ? c_seq : expf(logp - a.old_logps[i]);
    const float grad = policy_term(a, c, adv, logp).grad * (a.weights != nullptr ? a.weights[i] : 1.f);
    float dl = a.loss_code == 1 ? grad : (a.sequence_level ? 0.f : grad * c);
    if (a.sequence_level) dl += coupling;
    if (a.has_kl) {
      const float d = a.ref_logps[i] - logp, e = expf(d);
      if (a.bias_kl) {
        dl += a.beta * (1.f - e) * c;
        if (!a.sequence_level) dl += a.beta * (e - d - 1.f) * c;  // at sequence level it is part of `coupling`
      } else {
        dl += a.beta * (1.f - e);
      }
    }
    dlogps[i] = g_row * m * dl;
  }
}

LossArgs loss_args(const GrpoLossInputs& in) {
  return {in.logps,    in.old_logps,      in.ref_logps, in.advantages, in.mask, in.policy_weights,
          in.T,        in.beta,           in.eps_low,   in.eps_high,   in.delta,
          in.sapo_temperature_pos,        in.sapo_temperature_neg,      in.loss_code,
          in.sequence_level,              in.ref_logps != nullptr,      in.bias_correction_kl,
          in.has_delta};
}

}  // namespace

cudaError_t grpo_advantages(const float* rewards, int64_t batch, int64_t num_funcs, int64_t stride_b,
                            int64_t stride_r, const float* weights, int64_t num_generations, int scale,
                            bool normalize_then_sum, float std_eps, float* advantages, float* std_out,
                            cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  if (num_generations <= 0 || batch % num_generations != 0 || scale < 0 || scale > 2) return cudaErrorInvalidValue;
  const AdvantageArgs a{rewards,          stride_b,        stride_r,  weights, batch / num_generations,
                        num_generations,  num_funcs,       std_eps};
  if (normalize_then_sum) return launch_advantages<true, 0, true>(a, advantages, std_out, stream);
  switch (scale) {
    case 0:
      return launch_advantages<false, 0, false>(a, advantages, std_out, stream);
    case 1:
      return launch_advantages<false, 1, false>(a, advantages, std_out, stream);
    default:
      return launch_advantages<false, 2, true>(a, advantages, std_out, stream);
  }
}

cudaError_t grpo_loss_fwd(const GrpoLossInputs& in, int64_t batch, float* loss, float* tokens, float* kl,
                          float* clip_low, float* clip_high, float* clip_region, float* coef, float* dcoef,
                          cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  if (batch > 2147483647LL) return cudaErrorInvalidConfiguration;
  grpo_loss_fwd_kernel<<<static_cast<unsigned>(batch), kLossThreads, 0, stream>>>(
      loss_args(in), loss, tokens, kl, clip_low, clip_high, clip_region, coef, dcoef);
  return cudaGetLastError();
}

cudaError_t grpo_loss_bwd(const GrpoLossInputs& in, int64_t batch, const float* grad_rows, const float* tokens,
                          const float* coef, const float* dcoef, float* dlogps, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  if (batch > 2147483647LL) return cudaErrorInvalidConfiguration;
  grpo_loss_bwd_kernel<<<static_cast<unsigned>(batch), kLossThreads, 0, stream>>>(loss_args(in), grad_rows, tokens,
                                                                                 coef, dcoef, dlogps);
  return cudaGetLastError();
}

}  // namespace posttrain
