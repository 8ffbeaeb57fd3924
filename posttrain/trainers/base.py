"""What every posttrain trainer shares on top of transformers.Trainer."""

import warnings
from collections import defaultdict

import transformers
from accelerate.utils import is_peft_model
from packaging.version import Version
from transformers import Trainer


class PosttrainTrainer(Trainer):
    """transformers.Trainer with TRL's metric bookkeeping and gradient-accumulation contract.

    Subclasses append per-step values to `self._metrics[mode][name]` ("train" or "eval"); `log` averages them since
    the last log and merges them into the logged dict (prefixed "eval_" in evaluation), as TRL's trainers do.

    `loss_is_scaled_for_ga`: True when compute_loss already divides by the gradient-accumulation count (or normalizes
    by num_items_in_batch itself), False when Trainer must scale it, None to let Trainer decide.
    """

    loss_is_scaled_for_ga = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        # transformers < 5.19 has no loss_is_scaled_for_ga; it reads these two attributes instead
        if Version(transformers.__version__) < Version("5.19.0") and self.loss_is_scaled_for_ga is not None:
            self.model_accepts_loss_kwargs = False
            if self.loss_is_scaled_for_ga:
                self.compute_loss_func = "set: the loss is already scaled for gradient accumulation"

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {key: sum(values) / len(values) for key, values in self._metrics[mode].items() if values}
        if mode == "eval":
            metrics = {f"eval_{key}": value for key, value in metrics.items()}
        logs.update(metrics)
        super().log(logs, start_time)
        self._metrics[mode].clear()


def keep_liger_off_the_head(args) -> None:
    """TRL 1.16's deprecated use_liger_kernel: Liger's layer kernels may apply, but its fused linear cross entropy
    would replace the model's forward, which posttrain patches with the fused log-prob head."""
    if not args.use_liger_kernel:
        return
    warnings.warn(
        "use_liger_kernel=True is deprecated (as in TRL 1.16, removed in 2.0): use model_init_kwargs={'use_kernels': "
        "True}",
        FutureWarning,
        stacklevel=3,
    )
    liger_config = args.liger_kernel_config or {}
    if liger_config.get("fused_linear_cross_entropy"):
        raise ValueError(
            "liger_kernel_config={'fused_linear_cross_entropy': True} would replace the model's forward, which "
            "posttrain patches with its fused log-prob head"
        )
    args.liger_kernel_config = {**liger_config, "fused_linear_cross_entropy": False}


def check_peft_model(model, gradient_checkpointing: bool) -> None:
    """For a PEFT model: refuse an adapter on lm_head (the fused head reads lm_head.weight directly, so the adapter
    would never train) and, under gradient checkpointing, make the inputs require grad so the adapters get one."""
    if not is_peft_model(model):
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(model.get_output_embeddings(), BaseTunerLayer):
        raise ValueError(
            "a PEFT adapter on lm_head is not supported: the log-probs are computed from lm_head.weight directly, so "
            "the adapter would never be trained; remove 'lm_head' from target_modules"
        )
    if gradient_checkpointing:
        model.enable_input_require_grads()


def router_aux_loss_setup(model, coef: float | None) -> tuple[float, bool]:
    """(the Mixture-of-Experts load-balancing loss weight, whether it is added to the loss), as TRL 1.16 decides:
    `coef`, or the architecture's own router_aux_loss_coef when None; a nonzero coef on a dense model is an error."""
    text_config = model.config.get_text_config()
    is_moe = hasattr(text_config, "output_router_logits")
    if coef and not is_moe:
        raise ValueError(
            f"router_aux_loss_coef={coef}, but {type(model).__name__} is not a Mixture-of-Experts model that returns "
            "router logits: there is no auxiliary loss to weight"
        )
    effective = getattr(text_config, "router_aux_loss_coef", 0.0) if coef is None else coef
    return effective, is_moe and effective != 0.0
