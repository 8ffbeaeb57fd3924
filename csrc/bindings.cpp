// PyTorch custom ops over the CUDA launchers (posttrain_kernels.h): schemas, argument checks, the current stream.
// Built only where PyTorch has CUDA (setup.py's optional extension posttrain._C, or a JIT build); fake (meta) and
// autograd implementations are registered from Python (posttrain/ops/_cuda.py).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "posttrain_kernels.h"

extern "C" {
// An importable, empty `posttrain._C` module: importing it loads the library, which registers the ops.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace {

posttrain::DType kernel_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return posttrain::DType::kFloat32;
    case at::kBFloat16:
      return posttrain::DType::kBFloat16;
    case at::kHalf:
      return posttrain::DType::kFloat16;
    default:
      TORCH_CHECK(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "posttrain::", op, " failed to launch: ", cudaGetErrorString(err));
}

void check_rows(const at::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.is_cuda() && t.dim() == 1 && t.size(0) == n && t.is_contiguous(), name,
              " must be a contiguous CUDA tensor of shape [", n, "], got ", t.sizes());
}

const float* optional_rows(const std::optional<at::Tensor>& t, const char* name, int64_t n) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat, name, " must be float32, got ", t->scalar_type());
  check_rows(*t, name, n);
  return t->data_ptr<float>();
}

void check_logits(const at::Tensor& logits, const at::Tensor& targets) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.stride(1) == 1,
              "logits must be a CUDA tensor [N, V] with stride 1 in V, got sizes ", logits.sizes(), " strides ",
              logits.strides());
  TORCH_CHECK(targets.scalar_type() == at::kLong, "targets must be int64, got ", targets.scalar_type());
  check_rows(targets, "targets", logits.size(0));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> selective_log_softmax_fwd(const at::Tensor& logits,
                                                                         const at::Tensor& targets,
                                                                         double temperature, int64_t ignore_index,
                                                                         bool with_entropy) {
  check_logits(logits, targets);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n = logits.size(0);
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor logprob = at::empty({n}, f32);
  at::Tensor entropy = at::empty({with_entropy ? n : 0}, f32);
  at::Tensor lse = at::empty({2, n}, f32);  // (row max, log-sum)
  check_launch(posttrain::selective_log_softmax_fwd(
                   kernel_dtype(logits, "logits"), logits.data_ptr(), n, logits.size(1), logits.stride(0),
                   targets.data_ptr<int64_t>(), static_cast<float>(temperature), ignore_index,
                   logprob.data_ptr<float>(), with_entropy ? entropy.data_ptr<float>() : nullptr,
                   lse.data_ptr<float>(), lse.data_ptr<float>() + n, at::cuda::getCurrentCUDAStream()),
               "selective_log_softmax_fwd");
  return {logprob, entropy, lse};
}

at::Tensor selective_log_softmax_bwd(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                                     const std::optional<at::Tensor>& entropy,
                                     const std::optional<at::Tensor>& grad_logprob,
                                     const std::optional<at::Tensor>& grad_entropy, double temperature,
                                     int64_t ignore_index) {
  check_logits(logits, targets);
  const int64_t n = logits.size(0);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.dim() == 2 && lse.size(0) == 2 &&
                  lse.size(1) == n,
              "lse must be contiguous float32 [2, ", n, "], got ", lse.sizes());
  const float* g_entropy = optional_rows(grad_entropy, "grad_entropy", n);
  const float* saved_entropy = optional_rows(entropy, "entropy", n);
  TORCH_CHECK(g_entropy == nullptr || saved_entropy != nullptr, "grad_entropy needs the forward's entropy");
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor grad_logits = at::empty(logits.sizes(), logits.options());
  check_launch(posttrain::selective_log_softmax_bwd(
                   kernel_dtype(logits, "logits"), logits.data_ptr(), n, logits.size(1), logits.stride(0),
                   targets.data_ptr<int64_t>(), lse.data_ptr<float>(), lse.data_ptr<float>() + n, saved_entropy,
                   optional_rows(grad_logprob, "grad_logprob", n), g_entropy, static_cast<float>(temperature),
                   ignore_index, grad_logits.data_ptr(), grad_logits.stride(0), at::cuda::getCurrentCUDAStream()),
               "selective_log_softmax_bwd");
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY(posttrain, m) {
  m.def(
      "selective_log_softmax_fwd(Tensor logits, Tensor targets, float temperature, int ignore_index, "
      "bool with_entropy) -> (Tensor logprob, Tensor entropy, Tensor lse)");
  m.def(
      "selective_log_softmax_bwd(Tensor logits, Tensor targets, Tensor lse, Tensor? entropy, Tensor? grad_logprob, "
      "Tensor? grad_entropy, float temperature, int ignore_index) -> Tensor");
}

TORCH_LIBRARY_IMPL(posttrain, CUDA, m) {
  m.impl("selective_log_softmax_fwd", &selective_log_softmax_fwd);
  m.impl("selective_log_softmax_bwd", &selective_log_softmax_bwd);
}
