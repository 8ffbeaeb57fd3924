// selective_log_softmax on materialized logits: one pass over each row forward (16-byte loads, fp32 online
// softmax statistics), one read and one write backward.
#include <cmath>

#include "common.cuh"
#include "posttrain_kernels.h"

namespace posttrain {
namespace {

constexpr int kFwdThreads = 512;
constexpr int kBwdThreads = 256;

// Softmax statistics relative to `max`: sum = sum exp(z - max), ent = sum exp(z - max) * (z - max). Keeping the
// entropy numerator relative to the max means |z| ~ 1e4 logits lose nothing to cancellation.
struct SoftmaxStats {
  float max;
  float sum;
  float ent;
};

__device__ __forceinline__ SoftmaxStats rebase(SoftmaxStats st, float new_max) {
  if (st.sum == 0.f) return {new_max, 0.f, 0.f};
  const float shift = st.max - new_max;
  const float alpha = expf(shift);
  return {new_max, st.sum * alpha, alpha * (st.ent + shift * st.sum)};
}

__device__ __forceinline__ SoftmaxStats combine(SoftmaxStats a, SoftmaxStats b) {
  const float m = fmaxf(a.max, b.max);
  a = rebase(a, m);
  b = rebase(b, m);
  return {m, a.sum + b.sum, a.ent + b.ent};
}

// z = x / T with IEEE rounding, as torch's `logits / T`: multiplying by a rounded 1/T shifts every logit by the same
// relative error, which at |z| ~ 1e2 exceeds twice torch's own error.
__device__ __forceinline__ float scale(float x, float temperature) {
  return temperature == 1.f ? x : __fdiv_rn(x, temperature);
}

template <int N>
__device__ __forceinline__ void accumulate(SoftmaxStats& st, const float (&z)[N]) {
  float local = z[0];
#pragma unroll
  for (int i = 1; i < N; ++i) local = fmaxf(local, z[i]);
  if (local > st.max) st = rebase(st, local);
  if (st.max == -INFINITY) return;  // only -inf seen so far: nothing to add
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float d = z[i] - st.max;
    const float p = expf(d);
    st.sum += p;
    st.ent += p > 0.f ? p * d : 0.f;  // -inf logits: 0 * -inf would be NaN
  }
}

__device__ SoftmaxStats block_reduce(SoftmaxStats st) {
  __shared__ SoftmaxStats per_warp[32];
  for (int offset = 16; offset > 0; offset >>= 1) {
    SoftmaxStats other{__shfl_xor_sync(0xffffffff, st.max, offset), __shfl_xor_sync(0xffffffff, st.sum, offset),
                       __shfl_xor_sync(0xffffffff, st.ent, offset)};
    st = combine(st, other);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) per_warp[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < blockDim.x / 32 ? per_warp[lane] : SoftmaxStats{-INFINITY, 0.f, 0.f};
    for (int offset = 16; offset > 0; offset >>= 1) {
      SoftmaxStats other{__shfl_xor_sync(0xffffffff, st.max, offset), __shfl_xor_sync(0xffffffff, st.sum, offset),
                         __shfl_xor_sync(0xffffffff, st.ent, offset)};
      st = combine(st, other);
    }
  }
  return st;  // valid in thread 0
}

template <typename T>
__device__ __forceinline__ void accumulate_vec(SoftmaxStats& st, const Vec16<T>& v, float temperature) {
  float z[Vec16<T>::kSize];
#pragma unroll
  for (int j = 0; j < Vec16<T>::kSize; ++j) z[j] = scale(to_float(v.elems[j]), temperature);
  accumulate(st, z);
}

template <typename T, bool kEntropy>
__global__ void __launch_bounds__(kFwdThreads)
    selective_log_softmax_fwd_kernel(const T* __restrict__ logits, int64_t vocab, int64_t row_stride,
                                     const int64_t* __restrict__ targets, float temperature, int64_t ignore_index,
                                     bool vectorized, float* logprob, float* entropy, float* row_max,
                                     float* log_sum) {
  constexpr int kVec = Vec16<T>::kSize;
  const int64_t row = blockIdx.x;
  const T* x = logits + row * row_stride;
  SoftmaxStats st{-INFINITY, 0.f, 0.f};
  int64_t scalar_from = 0;
  if (vectorized) {
    const int64_t n_vec = vocab / kVec;
    int64_t i = threadIdx.x;
    // two loads in flight per thread before either is used
    for (; i + kFwdThreads < n_vec; i += 2 * kFwdThreads) {
      const Vec16<T> a = load_vec16(x + i * kVec);
      const Vec16<T> b = load_vec16(x + (i + kFwdThreads) * kVec);
      accumulate_vec(st, a, temperature);
      accumulate_vec(st, b, temperature);
    }
    if (i < n_vec) accumulate_vec(st, load_vec16(x + i * kVec), temperature);
    scalar_from = n_vec * kVec;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < vocab; i += kFwdThreads) {
    const float z[1] = {scale(to_float(x[i]), temperature)};
    accumulate(st, z);
  }
  st = block_reduce(st);
  if (threadIdx.x == 0) {
    const float ls = logf(st.sum);
    row_max[row] = st.max;
    log_sum[row] = ls;
    const int64_t target = targets[row];
    const bool valid = target != ignore_index;
    const float z_target = valid ? scale(to_float(x[target]), temperature) : 0.f;
    logprob[row] = valid ? (z_target - st.max) - ls : 0.f;
    if (kEntropy) entropy[row] = valid ? ls - st.ent / st.sum : 0.f;
  }
}

struct RowGrad {
  float max, log_sum, entropy, g_logprob, g_entropy, temperature;
  int64_t target;

  __device__ __forceinline__ float operator()(float x, int64_t col) const {
    const float z = scale(x, temperature);
    const float log_p = (z - max) - log_sum;
    const float p = expf(log_p);
    const float onehot = col == target ? 1.f : 0.f;
    return scale(g_logprob * (onehot - p) - g_entropy * p * (log_p + entropy), temperature);
  }
};

template <typename T>
__global__ void __launch_bounds__(kBwdThreads)
    selective_log_softmax_bwd_kernel(const T* __restrict__ logits, int64_t vocab, int64_t row_stride,
                                     const int64_t* __restrict__ targets, const float* row_max, const float* log_sum,
                                     const float* entropy, const float* grad_logprob, const float* grad_entropy,
                                     float temperature, int64_t ignore_index, bool vectorized, T* grad_logits,
                                     int64_t grad_row_stride) {
  constexpr int kVec = Vec16<T>::kSize;
  const int64_t row = blockIdx.x;
  const int64_t target = targets[row];
  const bool valid = target != ignore_index;
  const RowGrad grad{row_max[row],
                     log_sum[row],
                     entropy != nullptr ? entropy[row] : 0.f,
                     valid && grad_logprob != nullptr ? grad_logprob[row] : 0.f,
                     valid && grad_entropy != nullptr ? grad_entropy[row] : 0.f,
                     temperature,
                     target};
  const T* x = logits + row * row_stride;
  T* out = grad_logits + row * grad_row_stride;
  const int64_t unit = static_cast<int64_t>(blockIdx.y) * kBwdThreads + threadIdx.x;
  if (vectorized) {
    const int64_t col = unit * kVec;
    if (col + kVec <= vocab) {
      const Vec16<T> v = load_vec16(x + col);
      Vec16<T> g;
#pragma unroll
      for (int j = 0; j < kVec; ++j) g.elems[j] = from_float<T>(grad(to_float(v.elems[j]), col + j));
      store_vec16(out + col, g);
    } else {
      for (int64_t c = col; c < vocab; ++c) out[c] = from_float<T>(grad(to_float(x[c]), c));
    }
  } else if (unit < vocab) {
    out[unit] = from_float<T>(grad(to_float(x[unit]), unit));
  }
}

template <typename T>
bool rows_aligned(const void* base, int64_t row_stride) {
  return aligned16(base) && (row_stride * static_cast<int64_t>(sizeof(T))) % 16 == 0;
}

template <typename T>
cudaError_t launch_fwd(const void* logits, int64_t n_rows, int64_t vocab, int64_t row_stride, const int64_t* targets,
                       float temperature, int64_t ignore_index, float* logprob, float* entropy, float* row_max,
                       float* log_sum, cudaStream_t stream) {
  if (n_rows == 0) return cudaSuccess;
  const T* x = static_cast<const T*>(logits);
  const bool vectorized = rows_aligned<T>(logits, row_stride);
  const dim3 grid(static_cast<unsigned>(n_rows));
  if (entropy != nullptr) {
    selective_log_softmax_fwd_kernel<T, true><<<grid, kFwdThreads, 0, stream>>>(
        x, vocab, row_stride, targets, temperature, ignore_index, vectorized, logprob, entropy, row_max, log_sum);
  } else {
    selective_log_softmax_fwd_kernel<T, false><<<grid, kFwdThreads, 0, stream>>>(
        x, vocab, row_stride, targets, temperature, ignore_index, vectorized, logprob, entropy, row_max, log_sum);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const void* logits, int64_t n_rows, int64_t vocab, int64_t row_stride, const int64_t* targets,
                       const float* row_max, const float* log_sum, const float* entropy, const float* grad_logprob,
                       const float* grad_entropy, float temperature, int64_t ignore_index, void* grad_logits,
                       int64_t grad_row_stride, cudaStream_t stream) {
  if (n_rows == 0 || vocab == 0) return cudaSuccess;
  const bool vectorized = rows_aligned<T>(logits, row_stride) && rows_aligned<T>(grad_logits, grad_row_stride);
  const int64_t per_block = kBwdThreads * (vectorized ? Vec16<T>::kSize : 1);
  const int64_t col_blocks = (vocab + per_block - 1) / per_block;
  if (col_blocks > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(n_rows), static_cast<unsigned>(col_blocks));
  selective_log_softmax_bwd_kernel<T><<<grid, kBwdThreads, 0, stream>>>(
      static_cast<const T*>(logits), vocab, row_stride, targets, row_max, log_sum, entropy, grad_logprob,
      grad_entropy, temperature, ignore_index, vectorized, static_cast<T*>(grad_logits), grad_row_stride);
  return cudaGetLastError();
}

}  // namespace

cudaError_t selective_log_softmax_fwd(DType dtype, const void* logits, int64_t n_rows, int64_t vocab,
                                      int64_t row_stride, const int64_t* targets, float temperature,
                                      int64_t ignore_index, float* logprob, float* entropy, float* row_max,
                                      float* log_sum, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_fwd<float>(logits, n_rows, vocab, row_stride, targets, temperature, ignore_index, logprob,
                               entropy, row_max, log_sum, stream);
    case DType::kBFloat16:
      return launch_fwd<__nv_bfloat16>(logits, n_rows, vocab, row_stride, targets, temperature, ignore_index,
                                       logprob, entropy, row_max, log_sum, stream);
    case DType::kFloat16:
      return launch_fwd<__half>(logits, n_rows, vocab, row_stride, targets, temperature, ignore_index, logprob,
                                entropy, row_max, log_sum, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t selective_log_softmax_bwd(DType dtype, const void* logits, int64_t n_rows, int64_t vocab,
                                      int64_t row_stride, const int64_t* targets, const float* row_max,
                                      const float* log_sum, const float* entropy, const float* grad_logprob,
                                      const float* grad_entropy, float temperature, int64_t ignore_index,
                                      void* grad_logits, int64_t grad_row_stride, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_bwd<float>(logits, n_rows, vocab, row_stride, targets, row_max, log_sum, entropy, grad_logprob,
                               grad_entropy, temperature, ignore_index, grad_logits, grad_row_stride, stream);
    case DType::kBFloat16:
      return launch_bwd<__nv_bfloat16>(logits, n_rows, vocab, row_stride, targets, row_max, log_sum, entropy,
                                       grad_logprob, grad_entropy, temperature, ignore_index, grad_logits,
                                       grad_row_stride, stream);
    case DType::kFloat16:
      return launch_bwd<__half>(logits, n_rows, vocab, row_stride, targets, row_max, log_sum, entropy, grad_logprob,
                                grad_entropy, temperature, ignore_index, grad_logits, grad_row_stride, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace posttrain
