// Device helpers shared by posttrain's CUDA kernels: dtype conversion, 16-byte vector loads, block reductions.
// Plain CUDA C++ (no PyTorch headers), so the kernels compile with nvcc alone.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace posttrain {

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }

// Elements of T in one 16-byte access.
template <typename T>
struct Vec16 {
  static constexpr int kSize = 16 / sizeof(T);
  union {
    uint4 raw;
    T elems[kSize];
  };
};

template <typename T>
__device__ __forceinline__ Vec16<T> load_vec16(const T* ptr) {
  Vec16<T> v;
  v.raw = *reinterpret_cast<const uint4*>(ptr);
  return v;
}

template <typename T>
__device__ __forceinline__ void store_vec16(T* ptr, const Vec16<T>& v) {
  *reinterpret_cast<uint4*>(ptr) = v.raw;
}

__host__ __device__ __forceinline__ bool aligned16(const void* ptr) {
  return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffff, x, offset);
  return x;
}

}  // namespace posttrain
