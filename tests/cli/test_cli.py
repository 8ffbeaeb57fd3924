"""The `posttrain` command line: YAML + flag parsing (against `trl`'s parser), every training subcommand on the
embedded default, local datasets, `bench`, `accelerate launch`, and one-line errors with exit code 2."""

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict
from safetensors.torch import load_file

from posttrain import cli
from posttrain.models.presets import quickstart_causal_lm

ROOT = Path(__file__).resolve().parents[2]
# The smallest run of each trainer on the built-in model and dataset: a few steps, no checkpoints, float32
QUICK = ["--max_steps", "2", "--bf16", "false", "--report_to", "none", "--save_strategy", "no",
         "--per_device_train_batch_size", "2", "--logging_steps", "1"]  # fmt: skip
QUICK_GRPO = ["--num_generations", "2", "--max_completion_length", "6"]
QUICK_DISTILLATION = ["--max_completion_length", "6"]


def _teacher_dir(path: Path, like: str | None = None) -> str:
    """A saved teacher with the student's vocabulary and other weights: the built-in model of another seed, or (like a
    model directory) the tiny Qwen2 of another seed."""
    from posttrain.models import tiny_causal_lm

    model, tokenizer = tiny_causal_lm(seed=7) if like is not None else cli.builtin_model(seed=1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code: int, err: str, expected: str) -> None:
    """Exit code 2 and the problem on the last line of stderr, the only error line (what ran before it, such as a
    dataset's progress bar, may print above it), and no traceback."""
    assert code == cli.EXIT_USAGE
    assert "Traceback" not in err
    assert err.count("error:") == 1, err
    last = err.rstrip("\n").split("\n")[-1]
    assert "error:" in last and expected in last, err


# ---- parsing ----


def test_yaml_sets_values_and_flags_override_them(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CLI_TEST", "unset")  # restored after the test; the YAML's env: sets it
    config = tmp_path / "grpo.yaml"
    config.write_text(
        "env:\n  POSTTRAIN_CLI_TEST: 7\n"
        "learning_rate: 1e-5\n"  # YAML 1.1 reads this as a string; it is converted as a flag would be
        "max_steps: 3\nbf16: false\nuse_fused_kernels: false\n"
        "model_init_kwargs: {dtype: bfloat16}\n"
        "reward_funcs: accuracy_reward\nreward_weights: [1, 0.5]\n"
        "lr_scheduler_type: cosine\ndataset_name: data.jsonl\ndtype: bfloat16\n"
    )
    script, args, model, *_ = cli.parse_training_args(
        "grpo", ["--config", str(config), "--max_steps", "5", "--use_fused_kernels", "true", "--output_dir", "o"]
    )
    assert (args.learning_rate, args.max_steps, args.bf16, args.use_fused_kernels) == (1e-5, 5, False, True)
    assert args.model_init_kwargs == {"dtype": "bfloat16"}
    assert (script.reward_funcs, args.reward_weights) == (["accuracy_reward"], [1.0, 0.5])
    assert args.lr_scheduler_type == "cosine"
    assert (script.dataset_name, model.dtype) == ("data.jsonl", "bfloat16")
    assert os.environ["POSTTRAIN_CLI_TEST"] == "7"


@pytest.mark.parametrize("command", cli.TRAINERS)
def test_flags_parse_as_trl_parses_them(command):
    import trl
    from trl import ModelConfig, ScriptArguments, TrlParser

    argv = ["--output_dir", "out", "--learning_rate", "3e-5", "--max_steps", "7", "--bf16", "false",
            "--lr_scheduler_type", "cosine", "--gradient_accumulation_steps", "2", "--seed", "3",
            "--model_name_or_path", "some/model", "--dtype", "bfloat16", "--dataset_name", "some/data",
            "--dataset_train_split", "tr", "--dataset_test_split", "te", "--report_to", "none"]  # fmt: skip
    argv += {"sft": ["--max_length", "64", "--packing", "--load_in_4bit", "--bnb_4bit_quant_type", "fp4",
                     "--use_bnb_nested_quant", "--bnb_4bit_quant_storage", "bfloat16"], "dpo": ["--beta", "0.3", "--loss_type", "hinge"],
             "grpo": ["--beta", "0.04", "--num_generations", "4", "--loss_type", "grpo"],
             "kto": ["--beta", "0.2", "--desirable_weight", "1.5", "--loss_type", "apo_zero_unpaired",
                     "--max_length", "256", "--load_in_8bit"],
             "reward": ["--center_rewards_coefficient", "0.01", "--max_length", "256", "--disable_dropout", "false",
                        "--load_in_4bit", "--use_bnb_nested_quant"],
             "rloo": ["--beta", "0.1", "--num_generations", "4", "--normalize_advantages"],
             "distillation": ["--beta", "0.5", "--teacher_model_name_or_path", "some/teacher"]}[command]  # fmt: skip
    trl_config = getattr(trl, f"{cli.TRAINER_COMMANDS[command].name}Config")
    theirs = TrlParser((ScriptArguments, trl_config, ModelConfig)).parse_args_and_config(argv)
    ours = cli.parse_training_args(command, argv, with_peft=False)
    for mine, trl_object in zip(ours, theirs):
        shared = {f.name for f in dataclasses.fields(mine)} & {f.name for f in dataclasses.fields(trl_object)}
        shared -= {"logging_dir"}  # a timestamped default
        assert len(shared) >= 4
        for name in shared:
            assert getattr(mine, name) == getattr(trl_object, name), name


@pytest.mark.parametrize("command", cli.TRAINERS)
def test_help_lists_every_field_with_its_default_and_help(capsys, command):
    code, out, _ = _run(capsys, command, "--help")
    assert code == 0
    _, types = cli.build_parser(command)
    for cls in types:
        for field in dataclasses.fields(cls):
            if field.init:
                assert re.search(rf"--{field.name}(?![\w-])", out), field.name
    words = " ".join(out.split())
    assert "--config FILE.yaml" in words
    assert "False uses the plain PyTorch path through the full logits" in words  # use_fused_kernels' help
    assert re.search(r"--learning_rate LEARNING_RATE.*?initial.*?\(default: [0-9.e-]+\)", words, re.IGNORECASE)
    spec = cli.TRAINER_COMMANDS[command]
    assert f"posttrain's {spec.name}Trainer (as `trl {command}`)" in words and spec.builtin_data in words


def test_lora_flags_are_offered_with_peft():
    with_peft, _ = cli.build_parser("sft", with_peft=True)
    without, _ = cli.build_parser("sft", with_peft=False)
    assert "--lora_r" in with_peft.format_help() and "--use_peft" in with_peft.format_help()
    assert "--lora_r" not in without.format_help()
    *_, lora = cli.parse_training_args(
        "sft", ["--use_peft", "--lora_target_modules", "all-linear", "--output_dir", "o", "--bf16", "false"], True
    )
    assert (lora.use_peft, lora.lora_target_modules, lora.lora_r) == (True, "all-linear", 16)


@pytest.mark.skipif(not (ROOT / "examples").is_dir(), reason="needs a posttrain checkout")
@pytest.mark.parametrize("command", cli.TRAINERS)
def test_examples_are_valid_configs(command):
    # bf16 (TRL's default, meant for the GPU) is refused by transformers on a CPU-only machine
    script, args, model, *_ = cli.parse_training_args(command, ["--config", str(ROOT / "examples" / f"{command}.yaml"),
                                                            "--bf16", str(torch.cuda.is_available())])  # fmt: skip
    assert model.model_name_or_path.startswith("Qwen/") and script.dataset_name.startswith("trl-lib/")
    assert args.output_dir and args.learning_rate < 1e-4


def test_top_level_help_and_version(capsys):
    code, out, _ = _run(capsys)
    assert code == 0 and all(re.search(rf"^  {command} ", out, re.MULTILINE) for command in cli.COMMANDS)
    assert "(RewardConfig's fields, as `trl reward`)" in out and "(KTOConfig's fields, as `trl kto`)" in out
    code, out, _ = _run(capsys, "--version")
    assert code == 0 and out.startswith("posttrain ")


# ---- bad invocations: one line on stderr, exit code 2 ----


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


BAD_INVOCATIONS = {
    "unknown flag": (["sft", "--learnin_rate", "1e-4"], "unknown field --learnin_rate (did you mean --learning_rate?)"),
    "bad int flag": (["sft", "--max_steps", "abc"], "--max_steps"),
    "invalid value": (["grpo", "--loss_type", "sigmod", "--bf16", "false"], "loss_type 'sigmod' is not one of"),
    "unknown command": (["sfd"], "unknown command 'sfd' (did you mean sft?)"),
    "positional": (["sft", "stray"], "unexpected argument(s): stray"),
    "mixture": (["sft", "--datasets", "a"], "dataset mixtures are not supported"),
    "4 and 8 bits": (
        ["sft", "--bf16", "false", "--load_in_4bit", "--load_in_8bit"],
        "--load_in_4bit and --load_in_8bit",
    ),
    "quant type": (["sft", "--load_in_4bit", "--bnb_4bit_quant_type", "int4"], "invalid choice: 'int4'"),
    "missing config": (["sft", "--config", "/nonexistent/posttrain.yaml"], "No such file or directory"),
    "quickstart flag": (["quickstart", "--steps", "3"], "unrecognized arguments: --steps"),
    "kto choice": (["kto", "--loss_type", "sigmod", "--bf16", "false"], "invalid choice: 'sigmod'"),
    "kto weight": (["kto", "--bf16", "false", "--desirable_weight", "-1"], "desirable_weight must be a finite number"),
    "reward float": (["reward", "--center_rewards_coefficient", "high"], "--center_rewards_coefficient"),
    "reward unknown": (["reward", "--beta", "0.1"], "unknown field --beta"),
}


@pytest.mark.parametrize("argv,expected", BAD_INVOCATIONS.values(), ids=BAD_INVOCATIONS.keys())
def test_bad_invocation_is_one_line_and_exit_2(capsys, argv, expected):
    code, _, err = _run(capsys, *argv)
    _assert_one_line_error(code, err, expected)


BAD_YAML = {
    "float for int": ("max_steps: 1.5\n", "--config {}: max_steps: 1.5 is not an integer"),
    "text for float": ("learning_rate: fast\n", "learning_rate: 'fast' is not a number"),
    "bool for string": ("report_to: false\n", "report_to: got the boolean false, expected a string"),
    "list for scalar": ("learning_rate: [1, 2]\n", "learning_rate: got a list [1, 2], expected a number"),
    "bad choice": ("lr_scheduler_type: linearr\n", "lr_scheduler_type: 'linearr' is not one of: linear"),
    "unknown field": ("max_step: 3\n", "unknown field --max_step (did you mean --max_steps?)"),
    "not a mapping": ("- 1\n- 2\n", "expected a mapping of field: value, got a list"),
    "broken yaml": ("max_steps: [\n", "not valid YAML at line 2"),
    "null for int": ("max_steps: null\n", "max_steps: null is not allowed, expected an integer"),
}


@pytest.mark.parametrize("text,expected", BAD_YAML.values(), ids=BAD_YAML.keys())
def test_bad_yaml_is_one_line_and_exit_2(capsys, tmp_path, text, expected):
    path = _write(tmp_path / "bad.yaml", text)
    code, _, err = _run(capsys, "sft", "--config", path)
    _assert_one_line_error(code, err, expected.format(path))


def test_missing_model_and_dataset(capsys, tmp_path):
    code, _, err = _run(capsys, "sft", *QUICK, "--output_dir", str(tmp_path), "--model_name_or_path",
                        str(tmp_path / "no-such-model"))  # fmt: skip
    _assert_one_line_error(code, err, f"model_name_or_path '{tmp_path / 'no-such-model'}': no such directory")
    code, _, err = _run(capsys, "sft", *QUICK, "--output_dir", str(tmp_path), "--dataset_name", "missing.jsonl")
    _assert_one_line_error(code, err, "dataset_name 'missing.jsonl': no such file or directory")
    text_file = _write(tmp_path / "data.txt", "hello\n")
    code, _, err = _run(capsys, "sft", *QUICK, "--output_dir", str(tmp_path), "--dataset_name", text_file)
    _assert_one_line_error(code, err, "unsupported file type '.txt'")


def test_missing_split_and_reward(capsys, tmp_path):
    code, _, err = _run(capsys, "sft", *QUICK, "--output_dir", str(tmp_path), "--dataset_train_split", "validation")
    _assert_one_line_error(code, err, "dataset_train_split 'validation' is not a split of the built-in dataset")
    code, _, err = _run(capsys, "sft", *QUICK, "--output_dir", str(tmp_path), "--eval_strategy", "steps",
                        "--dataset_test_split", "dev")  # fmt: skip
    _assert_one_line_error(code, err, "dataset_test_split 'dev' is not a split of the built-in dataset")
    code, _, err = _run(capsys, "grpo", *QUICK, *QUICK_GRPO, "--output_dir", str(tmp_path), "--reward_funcs", "acc")
    _assert_one_line_error(code, err, "reward_funcs: reward function 'acc' is neither one of: accuracy_reward")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "1+1=", "solution": "2"}) + "\n")
    code, _, err = _run(capsys, "grpo", *QUICK, *QUICK_GRPO, "--output_dir", str(tmp_path), "--dataset_name",
                        str(prompts))  # fmt: skip
    _assert_one_line_error(code, err, "grpo needs a reward: --reward_funcs")
    code, _, err = _run(capsys, "reward", *QUICK, "--output_dir", str(tmp_path), "--eval_strategy", "steps")
    _assert_one_line_error(code, err, "dataset_test_split 'test' is not a split of the built-in dataset (its splits: "
                           "train)")  # fmt: skip


def test_wrong_dataset_for_the_trainer_is_one_line(capsys, tmp_path):
    data = str(_save("jsonl", tmp_path))  # prompt-completion rows: no label, no pairs
    code, _, err = _run(capsys, "kto", *QUICK, "--output_dir", str(tmp_path), "--dataset_name", data)
    _assert_one_line_error(code, err, "the train dataset has no 'label' column")
    code, _, err = _run(capsys, "reward", *QUICK, "--output_dir", str(tmp_path), "--dataset_name", data)
    _assert_one_line_error(code, err, "the train dataset has no 'chosen' or 'rejected' column")


@pytest.mark.skipif(cli.peft_available(), reason="peft is installed: the LoRA flags exist")
def test_lora_flag_without_peft_says_what_to_install(capsys):
    code, _, err = _run(capsys, "sft", "--use_peft", "--lora_r", "8")
    _assert_one_line_error(code, err, "--use_peft: LoRA flags (use_peft, lora_r, ...) need peft")


def test_console_script_reports_one_line_and_exit_2():
    result = subprocess.run(
        [sys.executable, "-m", "posttrain.cli", "dpo", "--beta", "high"], capture_output=True, text=True, check=False
    )
    _assert_one_line_error(result.returncode, result.stderr, "posttrain dpo: error: argument --beta: invalid float")


# A .jsonl file's text and the one-line error it gets, naming the file (and the line where one is at fault)
BAD_DATA_FILES = {
    "empty": (b"", "the file is empty"),
    "blank lines": (b"\n  \n", "the file has no rows (only blank lines)"),
    "malformed": (b'{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"\n',
                  "line 2 is not valid JSON: Expecting ',' delimiter (column 34)"),
    "binary": (b"\x89PNG\r\n\x1a\n" + bytes(range(128, 256)) * 4, "line 1 is not UTF-8 text (a binary file?)"),
    "not an object": (b'{"prompt": "a", "completion": "b"}\n"text"\n', "line 2 is a JSON str, not an object"),
}  # fmt: skip


@pytest.mark.parametrize("streaming", [False, True], ids=["loaded", "streamed"])
@pytest.mark.parametrize("content, expected", BAD_DATA_FILES.values(), ids=BAD_DATA_FILES.keys())
def test_an_unreadable_data_file_is_one_line_naming_it(capsys, tmp_path, content, expected, streaming):
    path = tmp_path / "train.jsonl"
    path.write_bytes(content)
    flags = ["--dataset_streaming"] if streaming else []
    code, _, err = _run(capsys, "sft", *QUICK, *flags, "--output_dir", str(tmp_path), "--dataset_name", str(path))
    _assert_one_line_error(code, err, f"dataset_name '{path}': {expected}")


def test_a_model_path_that_is_a_file_is_named(capsys, tmp_path):
    path = _write(tmp_path / "model.bin", "not a model")
    code, _, err = _run(capsys, "sft", *QUICK, "--output_dir", str(tmp_path), "--model_name_or_path", path)
    _assert_one_line_error(code, err, f"model_name_or_path '{path}': not a directory")


# ---- quantization (QLoRA) flags ----


def _model_args(*flags: str, peft: bool = True):
    _, config, model_args, *lora = cli.parse_training_args(
        "sft", ["--output_dir", "o", "--bf16", "false", *flags], with_peft=peft
    )
    return config, model_args, lora


# the CLI checks for bitsandbytes before it builds a quantization config (test_quantization_without_bitsandbytes_...)
needs_bitsandbytes = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                        reason="bitsandbytes is an optional extra: pip install 'posttrain[qlora]'")  # fmt: skip


@needs_bitsandbytes
def test_4bit_flags_build_trls_bitsandbytes_config(tiny_model_dir):
    from transformers import BitsAndBytesConfig

    flags = ["--model_name_or_path", tiny_model_dir, "--use_peft", "--load_in_4bit", "--dtype", "bfloat16",
             "--bnb_4bit_quant_type", "fp4", "--use_bnb_nested_quant", "--bnb_4bit_quant_storage", "bfloat16"]  # fmt: skip
    config, model_args, _ = _model_args(*flags)
    quantization = model_args.quantization_config()
    expected = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="fp4",
                                  bnb_4bit_use_double_quant=True, bnb_4bit_quant_storage=torch.bfloat16)  # fmt: skip
    assert quantization.to_dict() == expected.to_dict()
    name, _ = cli._resolve_model(model_args, config, quantization)
    assert name == tiny_model_dir and config.model_init_kwargs["quantization_config"] is quantization
    assert config.model_init_kwargs["dtype"] == "bfloat16"


@needs_bitsandbytes
def test_8bit_and_defaults():
    _, model_args, _ = _model_args("--load_in_8bit")
    assert model_args.quantization_config().to_dict()["load_in_8bit"] is True
    _, model_args, _ = _model_args("--load_in_4bit", "--dtype", "auto")
    quantization = model_args.quantization_config()
    assert (quantization.bnb_4bit_quant_type, quantization.bnb_4bit_use_double_quant) == ("nf4", False)
    assert quantization.bnb_4bit_compute_dtype == torch.float32  # transformers' default for dtype auto
    assert _model_args()[1].quantization_config() is None


def test_4bit_flags_without_4bit_warn():
    _, model_args, _ = _model_args("--bnb_4bit_quant_type", "fp4", "--use_bnb_nested_quant")
    with pytest.warns(UserWarning, match="bnb_4bit_quant_type, use_bnb_nested_quant: ignored, these flags take effect"):
        assert model_args.quantization_config() is None


BAD_QUANTIZATION = {
    "without use_peft": (["--load_in_4bit"], "--load_in_4bit needs --use_peft: a quantized model is not trained"),
    "8 bit without use_peft": (["--load_in_8bit"], "--load_in_8bit needs --use_peft"),
    "built-in model": (["--load_in_4bit", "--use_peft"],
                       "quantization (--load_in_4bit / --load_in_8bit) needs --model_name_or_path"),
    "bad storage": (["--load_in_4bit", "--use_peft", "--bnb_4bit_quant_storage", "int3"],
                    "--bnb_4bit_quant_storage 'int3': `bnb_4bit_quant_storage` must be a valid string"),
    "twice": (["--load_in_4bit", "--use_peft", "--model_name_or_path", "{model}", "--model_init_kwargs",
               '{"quantization_config": {"load_in_8bit": true}}'], "quantization_config is given both"),
}  # fmt: skip


@needs_bitsandbytes
@pytest.mark.parametrize("flags, expected", BAD_QUANTIZATION.values(), ids=BAD_QUANTIZATION.keys())
def test_bad_quantization_is_one_line(capsys, tmp_path, tiny_model_dir, flags, expected):
    flags = [flag.replace("{model}", tiny_model_dir) for flag in flags]
    code, _, err = _run(capsys, "sft", *QUICK, "--output_dir", str(tmp_path), *flags)
    _assert_one_line_error(code, err, expected)


def test_quantization_without_bitsandbytes_says_what_to_install(capsys, tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a)
    )
    code, _, err = _run(capsys, "sft", *QUICK, "--output_dir", str(tmp_path), "--load_in_4bit", "--use_peft")
    _assert_one_line_error(code, err, "--load_in_4bit needs bitsandbytes, which is not installed: pip install "
                           "'posttrain[qlora]'")  # fmt: skip


# ---- local datasets ----


ROWS = [{"prompt": f"{a}+1=", "completion": f" is {a + 1}"} for a in range(6)]


def _save(kind: str, root: Path) -> Path:
    data = Dataset.from_list(ROWS)
    if kind == "saved":
        DatasetDict(train=data, test=data.select(range(2))).save_to_disk(root / "saved")
        return root / "saved"
    if kind == "directory":
        (root / "dir").mkdir()
        data.to_json(root / "dir" / "train.jsonl")
        data.select(range(2)).to_json(root / "dir" / "test.jsonl")
        return root / "dir"
    path = root / f"data.{kind}"
    {"json": lambda: path.write_text(json.dumps(ROWS)), "jsonl": lambda: data.to_json(path),
     "csv": lambda: data.to_csv(path), "parquet": lambda: data.to_parquet(path)}[kind]()  # fmt: skip
    return path


@pytest.mark.parametrize("kind", ["json", "jsonl", "csv", "parquet", "saved", "directory"])
def test_local_datasets_load(tmp_path, kind):
    path = _save(kind, tmp_path)
    script = cli.ScriptArguments(dataset_name=str(path))
    dataset = cli.load_training_dataset("sft", script)
    assert dataset["train"].to_list() == ROWS
    if kind in ("saved", "directory"):
        assert dataset["test"].to_list() == ROWS[:2]


def test_options_without_effect_warn(tmp_path):
    path = _save("jsonl", tmp_path)
    with pytest.warns(UserWarning, match="dataset_config: ignored, a data file has no configurations"):
        cli.load_training_dataset("sft", cli.ScriptArguments(dataset_name=str(path), dataset_config="en"))
    with pytest.warns(UserWarning, match="lora_r, use_dora: ignored, LoRA flags take effect with --use_peft"):
        assert cli.LoraArguments(lora_r=8, use_dora=True).peft_config() is None
    _, config, model_args, *_ = cli.parse_training_args(
        "sft", ["--output_dir", str(tmp_path), "--bf16", "false", "--model_revision", "v2", "--dtype", "float16"]
    )
    with pytest.warns(UserWarning, match="model_revision: ignored, the built-in model is built in code"):
        model, tokenizer = cli._resolve_model(model_args, config)
    assert model.dtype == torch.float16 and tokenizer.eos_token == "<|im_end|>"


def test_builtin_dataset_is_the_default():
    pairs = {"prompt", "chosen", "rejected"}
    for command, columns in {"sft": {"prompt", "completion"}, "dpo": pairs, "grpo": {"prompt", "solution"},
                             "kto": pairs, "reward": pairs}.items():  # fmt: skip
        dataset = cli.load_training_dataset(command, cli.ScriptArguments())
        assert set(dataset) == ({"train"} if command == "reward" else {"train", "test"})
        assert set(dataset["train"].column_names) == columns


def test_builtin_reward_model_is_the_quickstart_body_with_a_score_head():
    classifier, tokenizer = cli.builtin_model(seed=3, classifier=True)
    causal_lm, _ = quickstart_causal_lm(seed=3)
    assert type(classifier).__name__ == "Qwen2ForSequenceClassification" and classifier.config.num_labels == 1
    assert classifier.config.pad_token_id == tokenizer.pad_token_id
    body, trained_body = causal_lm.model.state_dict(), classifier.model.state_dict()
    assert body.keys() == trained_body.keys() and all(torch.equal(body[k], trained_body[k]) for k in body)
    again, _ = cli.builtin_model(seed=3, classifier=True)
    other, _ = cli.builtin_model(seed=4, classifier=True)
    assert torch.equal(again.score.weight, classifier.score.weight)
    assert not torch.equal(other.score.weight, classifier.score.weight)


# ---- training runs on the embedded default ----


def _weights_changed(output_dir: Path, seed: int = 42, classifier: bool = False) -> bool:
    initial, _ = cli.builtin_model(seed, classifier)  # the CLI builds the default model with the config's seed
    trained = load_file(output_dir / "model.safetensors")
    return any(not torch.equal(trained[name], param) for name, param in initial.state_dict().items() if name in trained)


# The untrained model never answers right, so accuracy_reward is 0 everywhere and GRPO's advantages with it; this
# reward of the working directory varies with the completion (and exercises dotted reward paths)
VARYING_REWARD = "def byte_sum(completions, **kwargs):\n    return [float(sum(map(ord, c)) % 5) for c in completions]\n"


@pytest.mark.parametrize("command", cli.TRAINERS)
def test_every_trainer_runs_on_the_embedded_default(capsys, tmp_path, monkeypatch, command):
    extra = []
    if command in ("grpo", "rloo"):
        (tmp_path / "posttrain_cli_test_rewards.py").write_text(VARYING_REWARD)
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI adds the working directory, as TRL's does
        extra = [*QUICK_GRPO, "--reward_funcs", "posttrain_cli_test_rewards.byte_sum", "accuracy_reward"]
    if command == "distillation":
        extra = [*QUICK_DISTILLATION, "--teacher_model_name_or_path", _teacher_dir(tmp_path / "teacher")]
    code, out, err = _run(capsys, command, *QUICK, *extra, "--output_dir", str(tmp_path))
    assert code == 0, err[-3000:]
    assert f"model saved to {tmp_path}" in out
    assert (tmp_path / "config.json").is_file() and (tmp_path / "tokenizer.json").is_file()
    assert _weights_changed(tmp_path, classifier=cli.TRAINER_COMMANDS[command].classifier)
    assert "'loss'" in out  # logged at every step


@pytest.mark.parametrize("command", cli.TRAINERS)
def test_a_model_directory_is_loaded_and_trained(capsys, tmp_path, tiny_model_dir, command):
    extra = [*QUICK_GRPO, "--reward_funcs", "accuracy_reward"] if command in ("grpo", "rloo") else []
    if command == "distillation":  # a teacher other than the student, or the divergence (and the update) is 0
        teacher = _teacher_dir(tmp_path / "teacher", like=tiny_model_dir)
        extra = [*QUICK_DISTILLATION, "--teacher_model_name_or_path", teacher]
    code, _, err = _run(capsys, command, *QUICK, *extra, "--max_steps", "1", "--model_name_or_path", tiny_model_dir,
                          "--output_dir", str(tmp_path))  # fmt: skip
    assert code == 0, err[-3000:]
    trained, initial = load_file(tmp_path / "model.safetensors"), load_file(Path(tiny_model_dir) / "model.safetensors")
    # the reward model is the causal LM's body with a new score head
    assert trained.keys() - initial.keys() == ({"score.weight"} if command == "reward" else set())
    assert initial.keys() - trained.keys() == set()
    if command not in ("grpo", "rloo"):  # the untrained model never answers right: advantages and update are 0
        assert any(not torch.equal(trained[name], initial[name]) for name in initial)


def test_yaml_and_local_file_and_eval_split(capsys, tmp_path):
    data = _save("directory", tmp_path)
    config = _write(
        tmp_path / "sft.yaml",
        f"dataset_name: {data}\nmax_steps: 1\nbf16: false\nreport_to: none\n"
        "save_strategy: 'no'\neval_strategy: steps\neval_steps: 1\nper_device_train_batch_size: 2\n",
    )
    code, out, err = _run(capsys, "sft", "--config", config, "--output_dir", str(tmp_path / "out"))
    assert code == 0, err[-3000:]
    assert "'eval_loss'" in out  # the test split was evaluated
    assert _weights_changed(tmp_path / "out")


def test_lora_flags_train_an_adapter(capsys, tmp_path):
    pytest.importorskip("peft")
    lora = ["--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj"]
    code, _, err = _run(capsys, "sft", *QUICK, *lora, "--output_dir", str(tmp_path))
    assert code == 0, err[-3000:]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]


def test_reward_lora_needs_seq_cls_and_trains_the_score_head(capsys, tmp_path):
    pytest.importorskip("peft")
    lora = ["--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj"]
    code, _, err = _run(capsys, "reward", *QUICK, *lora, "--output_dir", str(tmp_path))
    _assert_one_line_error(code, err, "--lora_task_type CAUSAL_LM cannot adapt the sequence classifier")
    code, _, err = _run(capsys, "reward", *QUICK, *lora, "--lora_task_type", "SEQ_CLS", "--output_dir", str(tmp_path))
    assert code == 0, err[-3000:]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    adapter = load_file(tmp_path / "adapter_model.safetensors")
    initial, _ = cli.builtin_model(seed=42, classifier=True)
    score = next(value for name, value in adapter.items() if name.endswith("score.weight"))
    assert not torch.equal(score, initial.score.weight)  # the head trained with the adapters


def test_runs_under_accelerate_launch(tmp_path):
    data = _save("jsonl", tmp_path)
    command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--cpu", "--num_processes", "1",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "posttrain.cli", "sft", *QUICK, "--max_steps", "1", "--dataset_name", str(data),
               "--output_dir", str(tmp_path / "out")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_data_parallel_run_splits_the_data(tmp_path):
    # two CPU processes (gloo): 4 examples, 1 per process and step, so 2 steps make one epoch only if data-parallel
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS[:4]))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "posttrain.cli", "sft",
               *QUICK, "--per_device_train_batch_size", "1", "--use_cpu", "true", "--dataset_name", str(data),
               "--output_dir", str(tmp_path / "out")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = next(line for line in result.stdout.splitlines() if "train_runtime" in line)
    assert "'epoch': '1'" in summary, summary
    assert result.stdout.count("model saved to") == 1  # printed by the main process only


# ---- bench ----


@pytest.mark.skipif(not (ROOT / "benchmarks").is_dir(), reason="needs a posttrain checkout")
def test_bench_forwards_to_the_benchmark_suite(capfd):
    assert cli.main(["bench", "--help"]) == 0
    assert "python -m benchmarks" in capfd.readouterr().out


def test_bench_outside_a_checkout_says_so(capsys, monkeypatch):
    monkeypatch.setattr(cli, "checkout_root", lambda: None)
    code, _, err = _run(capsys, "bench", "--smoke")
    _assert_one_line_error(code, err, "the benchmark suite (benchmarks/) ships with the repository")
