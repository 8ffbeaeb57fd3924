"""What every posttrain trainer shares on top of transformers.Trainer."""

from collections import defaultdict

import transformers
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
