"""Training runs of the online trainers' parity tests (RLOO, Distillation), each trained once per test module."""

import warnings

import trl

import posttrain


class Runs:
    """Trains (case, library, extra config) once and keeps the trainer and its logs: the first `steps` training log
    entries, then the evaluation's when the case evaluates.

    trainer_name: "RLOO", "Distillation", ... (the <name>Config / <name>Trainer pair of trl and posttrain).
    cases: name -> (dataset function, trainer keyword arguments, config overrides, evaluate).
    """

    def __init__(self, tmp_path_factory, trainer_name: str, cases: dict, base_config: dict, **trainer_kwargs):
        self.tmp, self.trainer_name, self.cases, self.base = tmp_path_factory, trainer_name, cases, base_config
        self.trainer_kwargs, self.cache = trainer_kwargs, {}

    def get(self, name, library, **extra):
        key = (name, library, tuple(sorted(extra.items())))
        if key not in self.cache:
            dataset_fn, kwargs, overrides, evaluate = self.cases[name]
            module = trl if library == "trl" else posttrain
            config = getattr(module, f"{self.trainer_name}Config")
            args = config(output_dir=str(self.tmp.mktemp("out")), **{**self.base, **overrides, **extra})
            trainer = getattr(module, f"{self.trainer_name}Trainer")(
                args=args, train_dataset=dataset_fn(), eval_dataset=dataset_fn() if evaluate else None,
                **self.trainer_kwargs, **kwargs,
            )  # fmt: skip
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer.train()
                eval_logs = [trainer.evaluate()] if evaluate else []
            logs = [entry for entry in trainer.state.log_history if "train_runtime" not in entry]
            self.cache[key] = (trainer, logs[: self.base["max_steps"]] + eval_logs)
        return self.cache[key]
