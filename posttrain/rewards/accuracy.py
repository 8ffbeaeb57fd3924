"""accuracy_reward: is the completion's final answer mathematically equal to the reference solution (math-verify)."""

import logging
import threading
from collections.abc import Callable

from ._text import completion_text

# math-verify's timeouts use signal.alarm, which only the main thread may set
_PARSE_TIMEOUT_S = 10
_VERIFY_TIMEOUT_S = 5


def _math_verify():
    try:
        import math_verify
        from latex2sympy2_extended import NormalizationConfig
    except ImportError as err:
        raise ImportError("accuracy_reward needs math-verify: pip install 'math-verify[antlr4_13_2]'") from err
    return math_verify, NormalizationConfig


def _answer_extraction(math_verify, normalization_config):
    # The answer must be well-formed LaTeX, \boxed{} first; bare numbers without an anchor do not count
    return [
        math_verify.LatexExtractionConfig(
            normalization_config=normalization_config(units=True),
            boxed_match_priority=0,
            try_extract_without_anchor=False,
        )
    ]


def accuracy_reward(
    completions: list,
    solution: list[str],
    log_extra: Callable[[str, list], None] | None = None,
    **kwargs,
) -> list[float | None]:
    r"""1.0 where the completion's answer equals the `solution` column's, 0.0 where it does not, None where the
    solution itself cannot be parsed (the trainer then leaves that completion out of this function's statistics).

    The solution is parsed by math-verify's default extraction (LaTeX or a plain expression); the completion's answer
    is its first \boxed{} (else its first LaTeX expression), with units normalized; equality is math-verify's
    symbolic check. GRPOTrainer passes the dataset's `solution` column by name, and `log_extra` (to add the parsed
    gold and answer to the completions log); other keyword arguments are ignored.

    Args:
        completions: B completions, each a string or a list of one assistant message {"role", "content"}.
        solution: B reference answers (LaTeX or plain text).
        log_extra: optional callback(column, values), provided by GRPOTrainer.

    Returns:
        A list of B floats (1.0 / 0.0) or None.

    Example:
        >>> accuracy_reward([r"so \boxed{\frac{1}{3}}", r"\boxed{0.5}"], solution=[r"$\frac{1}{3}$", "1/3"])
        [1.0, 0.0]
    """
    if len(completions) != len(solution):
        raise ValueError(f"accuracy_reward got {len(completions)} completions but {len(solution)} solutions")
    math_verify, normalization_config = _math_verify()
    in_main_thread = threading.current_thread() is threading.main_thread()
    parse_timeout = _PARSE_TIMEOUT_S if in_main_thread else None
    verify_timeout = _VERIFY_TIMEOUT_S if in_main_thread else None
    if not in_main_thread:  # math-verify warns on every call that its timeout is off
        logging.getLogger("math_verify.parser").setLevel(logging.ERROR)
        logging.getLogger("math_verify.grader").setLevel(logging.ERROR)
    extraction = _answer_extraction(math_verify, normalization_config)

    rewards, golds, answers = [], [], []
    for completion, reference in zip(completions, solution):
        gold = math_verify.parse(reference, parsing_timeout=parse_timeout)
        if not gold:
            rewards.append(None)
            golds.append("[unparseable]")
            answers.append("[skipped]")
            continue
        answer = math_verify.parse(
            completion_text(completion), extraction_config=extraction, extraction_mode="first_match",
            parsing_timeout=parse_timeout,
        )  # fmt: skip
        rewards.append(float(math_verify.verify(gold, answer, timeout_seconds=verify_timeout)))
        golds.append(str(gold))
        answers.append(str(answer) if answer else "[unparseable]")
    if log_extra is not None:
        log_extra("solution", list(solution))
        log_extra("gold_parsed", golds)
        log_extra("answer_parsed", answers)
    return rewards
