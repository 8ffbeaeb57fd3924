"""The `posttrain` command line: `posttrain sft|dpo|grpo|rloo|kto|reward|distillation|quickstart|bench`.

    posttrain sft --config examples/sft.yaml --learning_rate 1e-5      # the YAML sets fields, flags override them
    accelerate launch -m posttrain.cli grpo --config examples/grpo.yaml  # the same, on every process
    posttrain quickstart                                                # SFT then GRPO on the built-in task

Each training command (TRAINER_COMMANDS) takes every field of its config (SFTConfig, DPOConfig, ...: TrainingArguments
and TRL's options) plus the script fields of the same `trl` command (model_name_or_path, dataset_name, ...) and its
bitsandbytes flags (--load_in_4bit, ... with --use_peft: QLoRA). A bad invocation (an unknown field, a value of the
wrong type, a model or dataset that does not exist, a data file that cannot be read) is reported as one line on
stderr with exit code 2.
"""

import argparse
import copy
import dataclasses
import difflib
import json
import os
import subprocess
import sys
import types
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posttrain import __version__
from posttrain._compat import end_training
from posttrain._optional import is_available, require

EXIT_USAGE = 2
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# TRL's CLI registers this name with fixed options
TRL_SOFT_OVERLONG = ("get_soft_overlong_punishment", {"max_completion_len": 1280, "soft_punish_cache": 256})

_LORA_HELP = "LoRA flags (use_peft, lora_r, ...) need peft: pip install 'posttrain[peft]'"
# Fields of TRL's CLI that posttrain's does not take, and why: named in the error instead of "unknown field"
_NOT_SUPPORTED = dict.fromkeys(
    ("datasets", "streaming", "test_split_size"),
    "dataset mixtures are not supported by posttrain's CLI: give one dataset with dataset_name",
)
_QUANTIZATION_4BIT_FIELDS = ("bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage")
# peft task types whose model wrapper expects a generative model (a causal / seq2seq LM), not a classifier
_GENERATIVE_TASK_TYPES = ("CAUSAL_LM", "SEQ_2_SEQ_LM")


class CLIError(Exception):
    """A bad invocation: reported as one line on stderr, with exit code 2."""


def require_module(module: str, feature: str) -> None:
    """posttrain._optional.require as a CLIError (one line on stderr, exit code 2).

    Example:
        >>> require_module("bitsandbytes", "--load_in_4bit")
    """
    try:
        require(module, feature)
    except ImportError as err:
        raise CLIError(str(err)) from None


@dataclasses.dataclass
class ScriptArguments:
    """Where the training data comes from (the fields of TRL's ScriptArguments)."""

    dataset_name: str | None = dataclasses.field(
        default=None,
        metadata={"help": "A hub dataset id, a local dataset directory, or a .json/.jsonl/.csv/.parquet file "
                  "(default: the built-in addition dataset for this command)."},
    )  # fmt: skip
    dataset_config: str | None = dataclasses.field(
        default=None, metadata={"help": "The dataset's configuration name (load_dataset's `name`)."}
    )
    dataset_train_split: str = dataclasses.field(default="train", metadata={"help": "The split to train on."})
    dataset_test_split: str = dataclasses.field(
        default="test", metadata={"help": "The split to evaluate on (used when eval_strategy is not 'no')."}
    )
    dataset_streaming: bool = dataclasses.field(
        default=False, metadata={"help": "Stream the dataset (an IterableDataset) instead of loading it."}
    )
    ignore_bias_buffers: bool = dataclasses.field(
        default=False,
        metadata={"help": "DDP: leave the model's boolean buffers (e.g. causal masks) out of the synchronization."},
    )


@dataclasses.dataclass
class GRPOScriptArguments(ScriptArguments):
    """ScriptArguments plus the reward sources of GRPO and RLOO (as TRL's GRPO and RLOO scripts)."""

    reward_funcs: list[str] | None = dataclasses.field(
        default=None,
        metadata={"help": "Reward functions: accuracy_reward, think_format_reward, soft_overlong_punishment (budget: "
                  "max_completion_length), get_soft_overlong_punishment (TRL's CLI values: 1280 tokens, cache 256), "
                  "or a dotted import path (my_module.my_reward). Default with the built-in dataset: accuracy_reward."},
    )  # fmt: skip
    reward_model_name_or_path: str | None = dataclasses.field(
        default=None, metadata={"help": "A sequence-classification reward model (hub id or local directory)."}
    )


@dataclasses.dataclass
class ModelArguments:
    """Which model to train and how to load it (the model fields of TRL's ModelConfig)."""

    model_name_or_path: str | None = dataclasses.field(
        default=None,
        metadata={"help": "A hub model id or a local directory (default: the built-in quickstart model, freshly "
                  "initialized, with its byte-level tokenizer)."},
    )  # fmt: skip
    model_revision: str = dataclasses.field(
        default="main", metadata={"help": "The model's revision on the hub: a branch, tag or commit id."}
    )
    dtype: str | None = dataclasses.field(
        default="float32",
        metadata={"help": "The dtype to load the model in.", "choices": ["auto", "bfloat16", "float16", "float32"]},
    )
    attn_implementation: str | None = dataclasses.field(
        default=None, metadata={"help": "The attention implementation, e.g. sdpa or flash_attention_2."}
    )
    load_in_8bit: bool = dataclasses.field(
        default=False, metadata={"help": "Load the base model quantized to 8 bits (bitsandbytes); needs --use_peft."}
    )
    load_in_4bit: bool = dataclasses.field(
        default=False,
        metadata={"help": "Load the base model quantized to 4 bits (bitsandbytes; QLoRA with --use_peft, which it "
                  "needs). Its compute dtype is --dtype (float32 for auto)."},
    )  # fmt: skip
    bnb_4bit_quant_type: str = dataclasses.field(
        default="nf4", metadata={"help": "The 4-bit data type.", "choices": ["fp4", "nf4"]}
    )
    use_bnb_nested_quant: bool = dataclasses.field(
        default=False, metadata={"help": "Quantize the 4-bit quantization constants too (double quantization)."}
    )
    bnb_4bit_quant_storage: str | None = dataclasses.field(
        default=None, metadata={"help": "The dtype the packed 4-bit weights are stored in (default uint8)."}
    )

    def __post_init__(self):
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("--load_in_4bit and --load_in_8bit exclude each other: pick one")

    def quantization_config(self):
        """The transformers BitsAndBytesConfig these fields describe (as TRL's get_quantization_config), or None
        without --load_in_4bit / --load_in_8bit (warning then about 4-bit flags given without effect)."""
        changed = [f.name for f in dataclasses.fields(self) if f.name in _QUANTIZATION_4BIT_FIELDS
                   and getattr(self, f.name) != f.default]  # fmt: skip
        if not self.load_in_4bit:
            _warn_unused(bool(changed), ", ".join(changed), "these flags take effect with --load_in_4bit")
        if not (self.load_in_4bit or self.load_in_8bit):
            return None
        flag = "--load_in_4bit" if self.load_in_4bit else "--load_in_8bit"
        require_module("bitsandbytes", flag)
        from transformers import BitsAndBytesConfig

        if self.load_in_8bit:
            return BitsAndBytesConfig(load_in_8bit=True)
        try:
            return BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_compute_dtype=None if self.dtype in (None, "auto") else self.dtype,
                bnb_4bit_quant_type=self.bnb_4bit_quant_type, bnb_4bit_use_double_quant=self.use_bnb_nested_quant,
                bnb_4bit_quant_storage=self.bnb_4bit_quant_storage,
            )  # fmt: skip
        except ValueError as err:  # the one free-form field: the storage dtype
            raise CLIError(f"--bnb_4bit_quant_storage {self.bnb_4bit_quant_storage!r}: {_one_line(err)}") from None


@dataclasses.dataclass
class LoraArguments:
    """A LoRA adapter (the PEFT fields of TRL's ModelConfig); offered when peft is installed."""

    use_peft: bool = dataclasses.field(default=False, metadata={"help": "Train a LoRA adapter instead of the model."})
    lora_r: int = dataclasses.field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = dataclasses.field(default=32, metadata={"help": "LoRA alpha (the scale is alpha / r)."})
    lora_dropout: float = dataclasses.field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | None = dataclasses.field(
        default=None, metadata={"help": "Modules to adapt, e.g. q_proj v_proj, or all-linear (default: peft's)."}
    )
    lora_target_parameters: list[str] | None = dataclasses.field(
        default=None, metadata={"help": "Parameters to adapt directly (e.g. MoE experts' weights)."}
    )
    lora_modules_to_save: list[str] | None = dataclasses.field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter."}
    )
    lora_task_type: str = dataclasses.field(
        default="CAUSAL_LM", metadata={"help": "peft's task type (SEQ_CLS for a reward model: its score head trains)."}
    )
    use_rslora: bool = dataclasses.field(default=False, metadata={"help": "Rank-stabilized LoRA: scale alpha/sqrt(r)."})
    use_dora: bool = dataclasses.field(default=False, metadata={"help": "Weight-decomposed LoRA (DoRA)."})

    def __post_init__(self):
        # a single value such as "all-linear" is peft's keyword, not a list of one module name
        if self.lora_target_modules is not None and len(self.lora_target_modules) == 1:
            self.lora_target_modules = self.lora_target_modules[0]

    def peft_config(self):
        """The LoraConfig these fields describe, or None without use_peft (warning about LoRA flags then unused)."""
        if not self.use_peft:
            changed = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != f.default]
            _warn_unused(bool(changed), ", ".join(changed), "LoRA flags take effect with --use_peft")
            return None
        from peft import LoraConfig

        extra = {} if self.lora_target_parameters is None else {"target_parameters": self.lora_target_parameters}
        return LoraConfig(
            task_type=self.lora_task_type, r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
            target_modules=self.lora_target_modules, modules_to_save=self.lora_modules_to_save, bias="none",
            use_rslora=self.use_rslora, use_dora=self.use_dora, **extra,
        )  # fmt: skip


def peft_available() -> bool:
    """Whether peft is installed (the LoRA flags are offered only then)."""
    return is_available("peft")


@dataclasses.dataclass(frozen=True)
class TrainerCommand:
    """A training command: `posttrain <command>` trains posttrain's <name>Trainer with its <name>Config, as
    `trl <command>` does, on the built-in dataset of posttrain.data.builtin (same key) when no dataset is named."""

    name: str  # the prefix of the classes: SFT -> SFTConfig, SFTTrainer
    summary: str  # its line in `posttrain --help`
    builtin_data: str  # what it trains on with no --dataset_name
    script_class: type = ScriptArguments
    classifier: bool = False  # the model is a sequence classifier: the built-in model gets a score head
    # the trainer's arguments beyond the shared ones, from the parsed (script, config)
    trainer_kwargs: Callable[[Any, Any], dict] = lambda script, config: {}


TRAINER_COMMANDS = {
    "sft": TrainerCommand("SFT", "supervised fine-tuning", "the built-in addition demonstrations"),
    "dpo": TrainerCommand("DPO", "direct preference optimization", "the built-in addition preference pairs"),
    "grpo": TrainerCommand(
        "GRPO", "group relative policy optimization", "the built-in addition prompts, rewarded by accuracy_reward",
        script_class=GRPOScriptArguments,
        trainer_kwargs=lambda script, config: {"reward_funcs": _reward_funcs(script, config, "grpo")},
    ),
    "rloo": TrainerCommand(
        "RLOO", "REINFORCE leave-one-out", "the built-in addition prompts, rewarded by accuracy_reward",
        script_class=GRPOScriptArguments,
        trainer_kwargs=lambda script, config: {"reward_funcs": _reward_funcs(script, config, "rloo")},
    ),
    "kto": TrainerCommand(
        "KTO", "Kahneman-Tversky optimization (unpaired preferences)",
        "the built-in addition preference pairs, each unpaired into a desirable and an undesirable example",
    ),
    "reward": TrainerCommand(
        "Reward", "reward modelling (a one-output sequence classifier)",
        "the built-in addition preference pairs (a train split only)", classifier=True,
    ),
    "distillation": TrainerCommand(
        "Distillation", "on-policy distillation from a teacher (--teacher_model_name_or_path)",
        "the built-in addition prompts",
        trainer_kwargs=lambda script, config: {"teacher_model": _teacher_model(config)},
    ),
}  # fmt: skip
TRAINERS = tuple(TRAINER_COMMANDS)
COMMANDS = (*TRAINERS, "quickstart", "bench")


def top_help() -> str:
    """The text of `posttrain --help`: the commands, one line each."""
    trainers = "\n".join(
        f"  {command:<12} {spec.summary} ({spec.name}Config's fields, as `trl {command}`)"
        for command, spec in TRAINER_COMMANDS.items()
    )
    return f"""usage: posttrain {{{",".join(COMMANDS)}}} [options]

TRL-compatible post-training with fused kernels (posttrain {__version__}).

commands:
{trainers}
  quickstart   SFT then GRPO on a built-in addition task, from scratch, offline; prints and saves the scores
  bench        the benchmark suite of a posttrain checkout (python -m benchmarks)

`posttrain COMMAND --help` lists a command's options. Multi-GPU: accelerate launch -m posttrain.cli COMMAND ..."""


def _trainer_classes(command: str):
    import posttrain

    name = TRAINER_COMMANDS[command].name
    return getattr(posttrain, f"{name}Config"), getattr(posttrain, f"{name}Trainer")


def _argument_parser_class():
    from transformers import HfArgumentParser

    class ArgumentParser(HfArgumentParser):
        def error(self, message):
            raise CLIError(message)

    return ArgumentParser


def build_parser(command: str, with_peft: bool | None = None):
    """The parser of `posttrain <command>` and the dataclasses it fills, in order: (script, config, model[, lora]).

    Example:
        >>> parser, dataclass_types = build_parser("grpo")
        >>> [t.__name__ for t in dataclass_types]
        ['GRPOScriptArguments', 'GRPOConfig', 'ModelArguments']
    """
    spec = TRAINER_COMMANDS[command]
    config_class, _ = _trainer_classes(command)
    dataclass_types = [spec.script_class, config_class, ModelArguments]
    if peft_available() if with_peft is None else with_peft:
        dataclass_types.append(LoraArguments)
    model = "the built-in quickstart model" + (" with a new score head (one output)" if spec.classifier else "")
    parser = _argument_parser_class()(
        dataclass_types,
        prog=f"posttrain {command}",
        usage=f"posttrain {command} [--config FILE.yaml] [--FIELD VALUE ...]",
        description=f"{spec.summary[0].upper()}{spec.summary[1:]}, with posttrain's {spec.name}Trainer (as `trl "
        f"{command}`). With no --model_name_or_path, {model} is trained from scratch; with no --dataset_name, on "
        f"{spec.builtin_data}.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config", metavar="FILE.yaml", help="A YAML mapping of field values (and an optional env: mapping of "
        "environment variables); flags given on the command line override it."
    )  # fmt: skip
    return parser, dataclass_types


def parse_training_args(command: str, argv: list[str], with_peft: bool | None = None) -> list:
    """The dataclasses of `posttrain <command> <argv>`: values from --config's YAML, overridden by flags.

    Raises CLIError (naming the field and the value) for unknown fields, ill-typed values and invalid configs.

    Example:
        >>> script, config, model = parse_training_args("sft", ["--learning_rate", "1e-4", "--output_dir", "out"])
        >>> config.learning_rate, script.dataset_train_split, model.model_name_or_path
        (0.0001, 'train', None)
    """
    parser, dataclass_types = build_parser(command, with_peft)
    argv = list(argv)
    config_path = _pop_config_path(argv)
    if config_path is not None:
        values = _read_yaml(config_path)
        _set_environment(values.pop("env", None), config_path)
        _apply_yaml(parser, dataclass_types, values, config_path)
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        raise CLIError(_unknown_message(unknown, parser))
    return [_instantiate(cls, namespace) for cls in dataclass_types]


def _pop_config_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config":
            if i + 1 >= len(argv):
                raise CLIError("--config needs a YAML file")
            del argv[i]
            return argv.pop(i)
        if arg.startswith("--config="):
            return argv.pop(i).split("=", 1)[1]
    return None


def _read_yaml(path: str) -> dict:
    import yaml

    try:
        with open(path) as f:
            values = yaml.safe_load(f)
    except OSError as err:
        raise CLIError(f"--config {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise CLIError(f"--config {path}: not valid YAML{line}: {getattr(err, 'problem', err)}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise CLIError(f"--config {path}: expected a mapping of field: value, got a {type(values).__name__}")
    return values


def _set_environment(env, path: str) -> None:
    if env is None:
        return
    if not isinstance(env, dict):
        raise CLIError(f"--config {path}: env must be a mapping of NAME: value, got {env!r}")
    for name, value in env.items():
        os.environ[str(name)] = str(value)


def _apply_yaml(parser, dataclass_types, values: dict, path: str) -> None:
    """Make the YAML's values the parser's defaults (so flags override them), converted and checked as flags are."""
    fields = {f.name: f for cls in dataclass_types for f in dataclasses.fields(cls)}
    # HfArgumentParser rewrites the fields' types in place (dict | str | None becomes str): read the annotations
    annotations = {name: hint for cls in dataclass_types for name, hint in typing.get_type_hints(cls).items()}
    unknown = [key for key in values if key not in fields]
    if unknown:
        raise CLIError(f"--config {path}: {_unknown_message([f'--{key}' for key in unknown], parser)}")
    for key, value in values.items():
        # a boolean field that defaults to True has a second action, --no_<field>, with the same dest
        actions = [action for action in parser._actions if action.dest == key]
        try:
            default = _yaml_value(key, value, actions[0], annotations[key], fields[key].default)
        except CLIError as err:
            raise CLIError(f"--config {path}: {err}") from None
        for action in actions:
            action.default = default
            action.required = False


def _yaml_value(name: str, value, action, annotation, default):
    kinds = _annotation_kinds(annotation)
    if value is None:
        if type(None) in kinds or default is None:
            return None
        raise CLIError(f"{name}: null is not allowed, expected {_expected(action)}")
    if isinstance(value, dict):
        if dict in kinds:
            return value
        raise CLIError(f"{name}: got a mapping {value!r}, expected {_expected(action)}")
    if action.nargs in ("+", "*"):
        return [_yaml_scalar(name, item, action) for item in (value if isinstance(value, list) else [value])]
    if isinstance(value, list):
        if list in kinds:
            return value
        raise CLIError(f"{name}: got a list {value!r}, expected {_expected(action)}")
    return _yaml_scalar(name, value, action)


def _yaml_scalar(name: str, value, action):
    if isinstance(value, (list, dict)):
        raise CLIError(f"{name}: the list item {value!r} is not {_expected(action)}")
    if isinstance(value, bool) and action.type in (str, int, float):
        raise CLIError(f"{name}: got the boolean {str(value).lower()}, expected {_expected(action)}")
    convert = action.type or str
    try:
        converted = convert(value if isinstance(value, str) else str(value))
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise CLIError(f"{name}: {value!r} is not {_expected(action)}") from None
    if action.choices is not None and converted not in action.choices:
        raise CLIError(f"{name}: {value!r} is not one of: {', '.join(map(str, action.choices))}")
    return converted


def _annotation_kinds(annotation) -> set:
    """The origin types an annotation admits (dict[str, Any] | str | None -> {dict, str, NoneType})."""
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    args = typing.get_args(annotation) if is_union else (annotation,)
    return {typing.get_origin(arg) or arg for arg in args}


def _expected(action) -> str:
    names = {int: "an integer", float: "a number", str: "a string"}
    if action.type in names:
        return names[action.type]
    if action.choices is not None:
        return f"one of {', '.join(map(str, action.choices))}"
    return "a boolean" if getattr(action.type, "__name__", "") == "string_to_bool" else "a valid value"


def _unknown_message(unknown: list[str], parser) -> str:
    flags = [arg.split("=", 1)[0] for arg in unknown if arg.startswith("-")]
    if not flags:
        return f"unexpected argument(s): {' '.join(unknown)} (fields are given as --FIELD VALUE)"
    known = [option for action in parser._actions for option in action.option_strings]
    reasons = []
    for flag in flags:
        name = flag.lstrip("-").replace("-", "_")
        if name in _NOT_SUPPORTED:
            reasons.append(f"{flag}: {_NOT_SUPPORTED[name]}")
        elif name in {f.name for f in dataclasses.fields(LoraArguments)}:
            reasons.append(f"{flag}: {_LORA_HELP}")
        else:
            close = difflib.get_close_matches(flag, known, n=1)
            reasons.append(f"unknown field {flag}" + (f" (did you mean {close[0]}?)" if close else ""))
    return "; ".join(reasons) + f" (see: {parser.prog} --help)"


def _instantiate(cls, namespace):
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if f.init}
    try:
        return cls(**values)
    except (ValueError, TypeError, NotImplementedError) as err:
        raise CLIError(_one_line(err)) from None


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


# ---- running a trainer ----


def run_training(command: str, argv: list[str]) -> int:
    """`posttrain <training command> ...`: parse, load the model and the data, train, save to output_dir."""
    script, config, model_args, *lora = parse_training_args(command, argv)
    spec = TRAINER_COMMANDS[command]
    peft_config = lora[0].peft_config() if lora else None
    if spec.classifier and peft_config is not None and peft_config.task_type in _GENERATIVE_TASK_TYPES:
        raise CLIError(
            f"--lora_task_type {peft_config.task_type} cannot adapt the sequence classifier that `posttrain {command}` "
            "trains (peft's wrapper for it needs generation methods the classifier lacks; `trl` fails there too): "
            "pass --lora_task_type SEQ_CLS, which also trains the score head"
        )
    quantization = model_args.quantization_config()
    if quantization is not None and peft_config is None:
        flag = "--load_in_4bit" if model_args.load_in_4bit else "--load_in_8bit"
        raise CLIError(f"{flag} needs --use_peft: a quantized model is not trained itself, LoRA adapters on it are")
    dataset = load_training_dataset(command, script)
    train_dataset, eval_dataset = _select_splits(dataset, script, config)
    model, processing_class = _resolve_model(model_args, config, quantization, classifier=spec.classifier)
    extra = spec.trainer_kwargs(script, config)
    _, trainer_class = _trainer_classes(command)
    try:
        trainer = trainer_class(
            model=model, args=config, train_dataset=train_dataset, eval_dataset=eval_dataset,
            processing_class=processing_class, peft_config=peft_config, **extra,
        )  # fmt: skip
    except (ValueError, NotImplementedError, ImportError, OSError) as err:
        raise CLIError(_one_line(err)) from None
    if script.ignore_bias_buffers:
        import torch

        trainer.model._ddp_params_and_buffers_to_ignore = [
            name for name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool
        ]
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)
    trainer.accelerator.print(f"Training done; model saved to {config.output_dir}")
    if config.push_to_hub:
        trainer.push_to_hub(dataset_name=script.dataset_name)
    end_training(trainer)
    return 0


def load_training_dataset(command: str, script: ScriptArguments):
    """The DatasetDict named by script.dataset_name (a data file, a local directory or a hub id), or the built-in
    dataset of `command` when none is named. Raises CLIError when it does not exist or cannot be read.

    Example:
        >>> load_training_dataset("sft", ScriptArguments(dataset_name="data/train.jsonl"))["train"]
        Dataset({features: ['prompt', 'completion'], num_rows: ...})
    """
    import datasets

    from posttrain.data.builtin import builtin_dataset
    from posttrain.models.loading import looks_like_path

    name = script.dataset_name
    if name is None:
        _warn_unused(script.dataset_config is not None, "dataset_config", "the built-in dataset has no configurations")
        return _maybe_stream(builtin_dataset(command), script.dataset_streaming)
    path = Path(name).expanduser()
    try:
        if path.is_file():
            _warn_unused(script.dataset_config is not None, "dataset_config", "a data file has no configurations")
            return _load_data_file(path, script.dataset_streaming)
        if path.is_dir() and _is_saved_dataset(path):
            _warn_unused(script.dataset_config is not None, "dataset_config", "a saved dataset has no configurations")
            loaded = datasets.load_from_disk(str(path))
            loaded = loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
            return _maybe_stream(loaded, script.dataset_streaming)
        if not path.is_dir() and (looks_like_path(name) or path.suffix.lower() in DATA_FILE_BUILDERS):
            raise CLIError(f"dataset_name {name!r}: no such file or directory")
        return datasets.load_dataset(str(path) if path.is_dir() else name, name=script.dataset_config,
                                     streaming=script.dataset_streaming)  # fmt: skip
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as err:
        raise CLIError(f"dataset_name {name!r}: could not load it: {_one_line(err)}") from None


def _load_data_file(path: Path, streaming: bool):
    """load_dataset of one data file; a file it cannot read (empty, binary, malformed) is a CLIError naming the file,
    and the line where one line is at fault."""
    import datasets
    import pyarrow

    builder = _file_builder(path)
    if path.stat().st_size == 0:
        raise CLIError(f"dataset_name {str(path)!r}: the file is empty")
    try:
        loaded = datasets.load_dataset(builder, data_files=str(path), streaming=streaming)
        if streaming:
            next(iter(loaded["train"]))  # a stream reads nothing until iterated: read its first row now
        return loaded
    except (StopIteration, ValueError, UnicodeDecodeError, pyarrow.ArrowException,
            datasets.exceptions.DatasetGenerationError) as err:  # fmt: skip
        problem = _json_problem(path) if builder == "json" else None
        problem = problem or _one_line(err.__cause__ or err) or "no rows could be read from it"
        raise CLIError(f"dataset_name {str(path)!r}: {problem}") from None


def _json_problem(path: Path) -> str | None:
    """What keeps a .json / .jsonl file from loading, found by reading it line by line (after load_dataset failed):
    the first line that is not UTF-8 text or not a JSON object, or no row at all. None when the lines look fine, or
    when a .json file may be one JSON document spread over lines."""
    rows = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                return f"line {number} is not UTF-8 text (a binary file?)"
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                if rows == 0 and path.suffix.lower() == ".json":
                    return None
                return f"line {number} is not valid JSON: {err.msg} (column {err.colno})"
            if not isinstance(row, dict):
                return f"line {number} is a JSON {type(row).__name__}, not an object of column values"
            rows += 1
    return None if rows else "the file has no rows (only blank lines)"


def _file_builder(path: Path) -> str:
    builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise CLIError(
            f"dataset_name {str(path)!r}: unsupported file type {path.suffix!r} (one of: "
            f"{', '.join(DATA_FILE_BUILDERS)}; or a dataset directory)"
        )
    return builder


def _is_saved_dataset(path: Path) -> bool:
    """Whether `path` holds a dataset written by save_to_disk (rather than data files for load_dataset)."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _maybe_stream(dataset, streaming: bool):
    import datasets

    if not streaming:
        return dataset
    return datasets.IterableDatasetDict({split: ds.to_iterable_dataset() for split, ds in dataset.items()})


def _select_splits(dataset, script: ScriptArguments, config):
    def missing(field: str, split: str) -> CLIError:
        where = script.dataset_name or "the built-in dataset"
        return CLIError(f"{field} {split!r} is not a split of {where} (its splits: {', '.join(dataset)})")

    if script.dataset_train_split not in dataset:
        raise missing("dataset_train_split", script.dataset_train_split)
    if config.eval_strategy == "no":
        return dataset[script.dataset_train_split], None
    if script.dataset_test_split not in dataset:
        raise missing("dataset_test_split", script.dataset_test_split)
    return dataset[script.dataset_train_split], dataset[script.dataset_test_split]


def _resolve_model(model_args: ModelArguments, config, quantization=None, classifier: bool = False):
    """(model, processing_class) for the trainer: a name with the loading options (and `quantization`, a
    BitsAndBytesConfig) put into config.model_init_kwargs (as `trl` does), or the built-in quickstart model (a
    sequence classifier with `classifier`) and its tokenizer when no model is named."""
    name = model_args.model_name_or_path
    if name is None:
        if quantization is not None:
            raise CLIError("quantization (--load_in_4bit / --load_in_8bit) needs --model_name_or_path: the built-in "
                           "model is built in code, not loaded")  # fmt: skip
        return _preset_model(model_args, config, classifier)
    from posttrain.models.loading import looks_like_path

    path = Path(name).expanduser()
    if not path.exists() and looks_like_path(name):
        raise CLIError(f"model_name_or_path {name!r}: no such directory")
    if path.exists() and not path.is_dir():
        raise CLIError(f"model_name_or_path {name!r}: not a directory (a model is a directory with its config.json)")
    loading = {
        "revision": model_args.model_revision,
        "trust_remote_code": config.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    user_kwargs = config.model_init_kwargs or {}
    if quantization is not None:
        if "quantization_config" in user_kwargs:
            raise CLIError(
                "quantization_config is given both in model_init_kwargs and by --load_in_4bit/--load_in_8bit"
            )
        loading["quantization_config"] = quantization
    config.model_init_kwargs = {**loading, **user_kwargs}
    return str(path) if path.exists() else name, None


def _preset_model(model_args: ModelArguments, config, classifier: bool = False):
    import torch

    ignored = {
        "model_revision": model_args.model_revision != "main",
        "model_init_kwargs": bool(config.model_init_kwargs),
        "trust_remote_code": config.trust_remote_code,
    }
    for field, given in ignored.items():
        _warn_unused(given, field, "the built-in model is built in code, not loaded")
    overrides = (
        {} if model_args.attn_implementation is None else {"attn_implementation": model_args.attn_implementation}
    )
    model, tokenizer = builtin_model(config.seed, classifier, **overrides)
    if model_args.dtype in ("bfloat16", "float16"):
        model = model.to(getattr(torch, model_args.dtype))
    return model, tokenizer


def builtin_model(seed: int, classifier: bool = False, **config_overrides):
    """The CLI's default model, freshly initialized from `seed` (float32), and its byte-level tokenizer: the
    quickstart causal LM, or with `classifier` a sequence classifier with one output (the causal LM's body of the same
    seed and a new score head), what RewardTrainer trains.

    Example:
        >>> model, tokenizer = builtin_model(seed=0, classifier=True)
        >>> type(model).__name__, model.config.num_labels
        ('Qwen2ForSequenceClassification', 1)
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    from posttrain.models.presets import quickstart_causal_lm

    causal_lm, tokenizer = quickstart_causal_lm(seed=seed, **config_overrides)
    if not classifier:
        return causal_lm, tokenizer
    config = copy.deepcopy(causal_lm.config)
    config.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(config)
    model.base_model.load_state_dict(causal_lm.base_model.state_dict())
    return model, tokenizer


def _reward_funcs(script: GRPOScriptArguments, config, command: str) -> list:
    from posttrain.rewards import accuracy_reward, get_reward_func, get_soft_overlong_punishment

    funcs = [script.reward_model_name_or_path] if script.reward_model_name_or_path else []
    for name in script.reward_funcs or []:
        if name == TRL_SOFT_OVERLONG[0]:
            funcs.append(get_soft_overlong_punishment(**TRL_SOFT_OVERLONG[1]))
            continue
        if "." in name and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # a dotted path may name a module of the working directory, as in TRL
        try:
            funcs.append(get_reward_func(name, max_completion_len=config.max_completion_length))
        except (ValueError, TypeError) as err:
            raise CLIError(f"reward_funcs: {_one_line(err)}") from None
    if funcs:
        return funcs
    if script.dataset_name is None:
        return [accuracy_reward]
    raise CLIError(f"{command} needs a reward: --reward_funcs (e.g. accuracy_reward) or --reward_model_name_or_path")


def _teacher_model(config) -> str:
    if config.teacher_model_name_or_path is None:
        raise CLIError(
            "distillation needs a teacher: --teacher_model_name_or_path (a hub id or local directory of a causal LM "
            "with the student's vocabulary)"
        )
    return config.teacher_model_name_or_path


def _warn_unused(given: bool, field: str, reason: str) -> None:
    if given:
        warnings.warn(f"{field}: ignored, {reason}", stacklevel=3)


# ---- quickstart and bench ----


def run_quickstart_command(argv: list[str]) -> int:
    """`posttrain quickstart [--output_dir DIR] [--seed N] [--smoke]`."""
    parser = _argument_parser_class()(
        prog="posttrain quickstart",
        description="Train the built-in model from scratch with SFT, then GRPO (accuracy_reward), on two-digit "
        "addition, offline; print exact-match accuracy on held-out problems and write DIR/quickstart_results.json "
        "and the checkpoints DIR/sft and DIR/grpo.",
        allow_abbrev=False,
    )
    parser.add_argument("--output_dir", default="posttrain-quickstart", help="Where results and checkpoints go.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the model's initialization and training.")
    parser.add_argument("--smoke", action="store_true", help="A few steps of each stage, to check the set-up (the "
                        "scores mean nothing).")  # fmt: skip
    args = parser.parse_args(argv)
    from posttrain.quickstart import run_quickstart

    run_quickstart(args.output_dir, smoke=args.smoke, seed=args.seed)
    return 0


def checkout_root() -> Path | None:
    """The posttrain checkout holding benchmarks/: the one posttrain is imported from, else the working directory."""
    import posttrain

    for candidate in (Path(posttrain.__file__).resolve().parents[1], Path.cwd()):
        if (candidate / "benchmarks" / "__main__.py").is_file() and (candidate / "posttrain").is_dir():
            return candidate
    return None


def run_bench(argv: list[str]) -> int:
    """`posttrain bench ARGS`: `python -m benchmarks ARGS` in the checkout (benchmarks/ is not installed)."""
    root = checkout_root()
    if root is None:
        raise CLIError(
            "the benchmark suite (benchmarks/) ships with the repository, not the package: run it from a posttrain "
            "checkout installed with pip install -e '.[bench]'"
        )
    return subprocess.call([sys.executable, "-m", "benchmarks", *argv], cwd=root)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `posttrain` command; returns the exit code (2 for a bad invocation)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(top_help())
        return 0
    if argv[0] == "--version":
        print(f"posttrain {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    runners = {
        **dict.fromkeys(TRAINERS, lambda: run_training(command, rest)),
        "quickstart": lambda: run_quickstart_command(rest),
        "bench": lambda: run_bench(rest),
    }
    if command not in runners:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        print(f"posttrain: error: unknown command {command!r}{hint}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return runners[command]()
    except CLIError as err:
        print(f"posttrain {command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exit_:  # argparse's --help
        return exit_.code or 0


if __name__ == "__main__":
    raise SystemExit(main())
