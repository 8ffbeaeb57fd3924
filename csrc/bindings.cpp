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

at::Tensor as_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  return t.to(at::kFloat).contiguous();
}

std::tuple<at::Tensor, at::Tensor> grpo_advantages(const at::Tensor& rewards, const at::Tensor& weights,
                                                   int64_t num_generations, int64_t scale, bool normalize_then_sum,
                                                   bool return_std, double std_eps) {
  TORCH_CHECK(rewards.dim() == 2, "rewards must be [B, R], got ", rewards.sizes());
  const int64_t batch = rewards.size(0);
  TORCH_CHECK(num_generations > 0 && batch % num_generations == 0, "num_generations (", num_generations,
              ") must divide the batch (", batch, ")");
  TORCH_CHECK(scale >= 0 && scale <= 2, "scale must be 0 (none), 1 (group) or 2 (batch), got ", scale);
  const at::Tensor r = as_f32(rewards, "rewards");
  const at::Tensor w = as_f32(weights, "weights");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == r.size(1), "weights must be [", r.size(1), "], got ", w.sizes());
  const c10::cuda::CUDAGuard guard(r.device());
  at::Tensor advantages = at::empty({batch}, r.options());
  at::Tensor std = at::empty({return_std ? batch : 0}, r.options());
  check_launch(posttrain::grpo_advantages(r.data_ptr<float>(), batch, r.size(1), r.stride(0), r.stride(1),
                                          w.data_ptr<float>(), num_generations, static_cast<int>(scale),
                                          normalize_then_sum, static_cast<float>(std_eps),
                                          advantages.data_ptr<float>(), return_std ? std.data_ptr<float>() : nullptr,
                                          at::cuda::getCurrentCUDAStream()),
               "grpo_advantages");
  return {advantages, std};
}

// The float32 contiguous operands of the loss kernels (kept alive by the caller) and the kernels' view of them.
struct LossOperands {
  at::Tensor logps, old_logps, ref_logps, advantages, mask, weights;
  posttrain::GrpoLossInputs inputs;
};

LossOperands loss_operands(const at::Tensor& logps, const at::Tensor& old_logps,
                           const std::optional<at::Tensor>& ref_logps, const at::Tensor& advantages,
                           const at::Tensor& mask, const std::optional<at::Tensor>& policy_weights, double beta, double epsilon_low, double epsilon_high,
                           std::optional<double> delta, double sapo_temperature_pos, double sapo_temperature_neg,
                           int64_t loss_code, bool sequence_level, bool bias_correction_kl) {
  TORCH_CHECK(logps.dim() == 2, "logps must be [B, T], got ", logps.sizes());
  TORCH_CHECK(loss_code >= 0 && loss_code <= 2, "loss_code must be 0, 1 or 2, got ", loss_code);
  LossOperands op;
  op.logps = as_f32(logps, "logps");
  op.old_logps = as_f32(old_logps, "old_logps");
  op.mask = as_f32(mask, "mask");
  op.advantages = as_f32(advantages, "advantages");
  const bool has_kl = ref_logps.has_value() && ref_logps->defined();
  if (has_kl) op.ref_logps = as_f32(*ref_logps, "ref_logps");
  const bool has_weights = policy_weights.has_value() && policy_weights->defined();
  if (has_weights) {
    TORCH_CHECK(policy_weights->dim() == 2 && policy_weights->size(0) == op.logps.size(0) &&
                    (policy_weights->size(1) == 1 || policy_weights->size(1) == op.logps.size(1)),
                "policy_weights must be [B, T] or [B, 1], got ", policy_weights->sizes());
    op.weights = as_f32(policy_weights->expand(op.logps.sizes()), "policy_weights");
  }
  for (const at::Tensor* t : {&op.old_logps, &op.mask}) {
    TORCH_CHECK(t->sizes() == op.logps.sizes(), "old_logps and mask must match logps ", op.logps.sizes());
  }
  TORCH_CHECK(!has_kl || op.ref_logps.sizes() == op.logps.sizes(), "ref_logps must match logps ", op.logps.sizes());
  TORCH_CHECK(op.advantages.dim() == 1 && op.advantages.size(0) == op.logps.size(0), "advantages must be [",
              op.logps.size(0), "], got ", op.advantages.sizes());
  op.inputs = {op.logps.data_ptr<float>(),
               op.old_logps.data_ptr<float>(),
               has_kl ? op.ref_logps.data_ptr<float>() : nullptr,
               op.advantages.data_ptr<float>(),
               op.mask.data_ptr<float>(),
               has_weights ? op.weights.data_ptr<float>() : nullptr,
               op.logps.size(1),
               static_cast<float>(beta),
               static_cast<float>(epsilon_low),
               static_cast<float>(epsilon_high),
               static_cast<float>(delta.value_or(0.0)),
               static_cast<float>(sapo_temperature_pos),
               static_cast<float>(sapo_temperature_neg),
               static_cast<int>(loss_code),
               sequence_level,
               bias_correction_kl,
               delta.has_value()};
  return op;
}

std::vector<at::Tensor> grpo_loss_fwd(const at::Tensor& logps, const at::Tensor& old_logps,
                                      const std::optional<at::Tensor>& ref_logps, const at::Tensor& advantages,
                                      const at::Tensor& mask, const std::optional<at::Tensor>& policy_weights,
                                      double beta, double epsilon_low, double epsilon_high,
                                      std::optional<double> delta, double sapo_temperature_pos,
                                      double sapo_temperature_neg, int64_t loss_code, bool sequence_level,
                                      bool bias_correction_kl) {
  const LossOperands op = loss_operands(logps, old_logps, ref_logps, advantages, mask, policy_weights, beta,
                                        epsilon_low, epsilon_high, delta, sapo_temperature_pos, sapo_temperature_neg,
                                        loss_code, sequence_level, bias_correction_kl);
  const c10::cuda::CUDAGuard guard(op.logps.device());
  const int64_t batch = op.logps.size(0);
  std::vector<at::Tensor> out;  // loss, tokens, kl, clip_low, clip_high, clip_region, coef, dcoef
  for (int i = 0; i < 8; ++i) out.push_back(at::zeros({batch}, op.logps.options()));
  check_launch(posttrain::grpo_loss_fwd(op.inputs, batch, out[0].data_ptr<float>(), out[1].data_ptr<float>(),
                                        out[2].data_ptr<float>(), out[3].data_ptr<float>(), out[4].data_ptr<float>(),
                                        out[5].data_ptr<float>(), out[6].data_ptr<float>(), out[7].data_ptr<float>(),
                                        at::cuda::getCurrentCUDAStream()),
               "grpo_loss_fwd");
  return out;
}

at::Tensor grpo_loss_bwd(const at::Tensor& logps, const at::Tensor& old_logps,
                         const std::optional<at::Tensor>& ref_logps, const at::Tensor& advantages,
                         const at::Tensor& mask, const std::optional<at::Tensor>& policy_weights,
                         const at::Tensor& grad_rows, const at::Tensor& tokens,
                         const at::Tensor& coef, const at::Tensor& dcoef, double beta, double epsilon_low,
                         double epsilon_high, std::optional<double> delta, double sapo_temperature_pos,
                         double sapo_temperature_neg, int64_t loss_code, bool sequence_level,
                         bool bias_correction_kl) {
  const LossOperands op = loss_operands(logps, old_logps, ref_logps, advantages, mask, policy_weights, beta,
                                        epsilon_low, epsilon_high, delta, sapo_temperature_pos, sapo_temperature_neg,
                                        loss_code, sequence_level, bias_correction_kl);
  const int64_t batch = op.logps.size(0);
  for (const at::Tensor* t : {&grad_rows, &tokens, &coef, &dcoef}) check_rows(*t, "per-row input", batch);
  const c10::cuda::CUDAGuard guard(op.logps.device());
  at::Tensor dlogps = at::empty(op.logps.sizes(), op.logps.options());
  check_launch(posttrain::grpo_loss_bwd(op.inputs, batch, as_f32(grad_rows, "grad_rows").data_ptr<float>(),
                                        tokens.data_ptr<float>(), coef.data_ptr<float>(), dcoef.data_ptr<float>(),
                                        dlogps.data_ptr<float>(), at::cuda::getCurrentCUDAStream()),
               "grpo_loss_bwd");
  return dlogps;
}

}  // namespace

TORCH_LIBRARY(posttrain, m) {
  m.def(
      "selective_log_softmax_fwd(Tensor logits, Tensor targets, float temperature, int ignore_index, "
      "bool with_entropy) -> (Tensor logprob, Tensor entropy, Tensor lse)");
  m.def(
      "selective_log_softmax_bwd(Tensor logits, Tensor targets, Tensor lse, Tensor? entropy, Tensor? grad_logprob, "
      "Tensor? grad_entropy, float temperature, int ignore_index) -> Tensor");
  m.def(
      "grpo_advantages(Tensor rewards, Tensor weights, int num_generations, int scale, bool normalize_then_sum, "
      "bool return_std, float std_eps) -> (Tensor advantages, Tensor std)");
  m.def(
      "grpo_loss_fwd(Tensor logps, Tensor old_logps, Tensor? ref_logps, Tensor advantages, Tensor mask, "
      "Tensor? policy_weights, float beta, "
      "float epsilon_low, float epsilon_high, float? delta, float sapo_temperature_pos, float sapo_temperature_neg, "
      "int loss_code, bool sequence_level, bool bias_correction_kl) -> Tensor[]");
  m.def(
      "grpo_loss_bwd(Tensor logps, Tensor old_logps, Tensor? ref_logps, Tensor advantages, Tensor mask, "
      "Tensor? policy_weights, Tensor grad_rows, Tensor tokens, Tensor coef, Tensor dcoef, float beta, float epsilon_low, float epsilon_high, "
      "float? delta, float sapo_temperature_pos, float sapo_temperature_neg, int loss_code, bool sequence_level, "
      "bool bias_correction_kl) -> Tensor");
}

TORCH_LIBRARY_IMPL(posttrain, CUDA, m) {
  m.impl("selective_log_softmax_fwd", &selective_log_softmax_fwd);
  m.impl("selective_log_softmax_bwd", &selective_log_softmax_bwd);
  m.impl("grpo_advantages", &grpo_advantages);
  m.impl("grpo_loss_fwd", &grpo_loss_fwd);
  m.impl("grpo_loss_bwd", &grpo_loss_bwd);
}
