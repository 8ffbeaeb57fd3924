"""Length shaping: DAPO's soft overlong punishment."""


class SoftOverlongPunishment:
    """Reward function penalizing completions that run into the length budget (DAPO, Eq. 13).

    With L = max_completion_len and C = soft_punish_cache, a completion of n tokens gets 0 for n <= L - C, a penalty
    falling linearly from 0 to -1 for L - C < n <= L, and -1 beyond L. It reads `completion_ids` (token counts, not
    characters). A class rather than a closure so it pickles; its `__name__` is the metric name
    (rewards/soft_overlong_punishment_reward/mean, as TRL logs it).
    """

    __name__ = "soft_overlong_punishment_reward"

    def __init__(self, max_completion_len: int, soft_punish_cache: int):
        if not isinstance(max_completion_len, int) or max_completion_len < 1:
            raise ValueError(f"max_completion_len must be an integer >= 1, got {max_completion_len!r}")
        if not isinstance(soft_punish_cache, int) or not 0 <= soft_punish_cache <= max_completion_len:
            raise ValueError(
                f"soft_punish_cache must be an integer in [0, max_completion_len={max_completion_len}], got "
                f"{soft_punish_cache!r}"
            )
        self.max_completion_len = max_completion_len
        self.soft_punish_cache = soft_punish_cache

    def _penalty(self, length: int) -> float:
        free = self.max_completion_len - self.soft_punish_cache
        if length <= free:
            return 0.0
        if length <= self.max_completion_len:
            return (free - length) / self.soft_punish_cache
        return -1.0

    def __call__(self, completion_ids: list[list[int]], **kwargs) -> list[float]:
        return [self._penalty(len(ids)) for ids in completion_ids]


def get_soft_overlong_punishment(
    max_completion_len: int, soft_punish_cache: int | None = None
) -> SoftOverlongPunishment:
    """A reward function: 0 for completions of at most max_completion_len - soft_punish_cache tokens, then a linear
    penalty down to -1 at max_completion_len, and -1 beyond (DAPO's overlong reward shaping).

    Args:
        max_completion_len: the length budget L in tokens (usually GRPOConfig.max_completion_length).
        soft_punish_cache: width C of the penalty ramp, in [0, L]; default L // 5 (DAPO's 4096 of 20480).

    Returns:
        A callable `f(completion_ids, **kwargs) -> list[float]` with TRL's reward-function signature.

    Example:
        >>> penalty = get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=20)
        >>> penalty(completion_ids=[[0] * 70, [0] * 90, [0] * 120])
        [0.0, -0.5, -1.0]
    """
    if soft_punish_cache is None and isinstance(max_completion_len, int):
        soft_punish_cache = max_completion_len // 5
    return SoftOverlongPunishment(max_completion_len, soft_punish_cache)
