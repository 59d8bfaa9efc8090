"""Rewards named in the config by import path, weighted and summed into one score per response.

A reward is any callable ``fn(responses: list[str], samples: list[dict]) -> Tensor`` of shape
(B,), float32 (B responses). ``samples[i]`` is the data record ``responses[i]`` answers, plus
``response_length``: the response's length in tokens as the trainer scores it (the stop token
included), for length-aware rewards. Keyword arguments of ``fn`` come from the term's ``kwargs``.
YAML lists ``RewardTerm``s; ``resolve_rewards`` imports them once at setup, ``score_responses``
calls them every step:

    rewards:
      - fn: maye_pl.rewards.accuracy_reward
      - fn: maye_pl.rewards.language_reward
      - {fn: my_project.rewards.length_bonus, weight: 0.5, name: length}
      - {fn: maye_pl.rewards.soft_overlong_punishment, kwargs: {max_length: 2048, cache_length: 512}}
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from maye_pl.rewards.functions import ACCURACY_REWARDS

RewardFn = Callable[[list[str], list[dict]], torch.Tensor]
_REWARD_CONTRACT = "a callable fn(responses: list[str], samples: list[dict]) -> Tensor (B,) float32"


@dataclass
class RewardTerm:
    """One reward in the total: ``weight * fn(responses, samples)``."""

    fn: str
    """Dotted import path of the reward callable, e.g. ``maye_pl.rewards.accuracy_reward``."""

    weight: float = 1.0
    """Multiplies this reward in the total score (the component is logged unweighted)."""

    name: str | None = None
    """Name of the component in the logs (``reward/<name>``); defaults to the function's name."""

    kwargs: dict[str, Any] | None = None
    """Keyword arguments ``fn`` is called with every step, e.g. ``{max_length: 2048, cache_length: 512}``."""

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.fn, str) or not self.fn.strip():
            problems.append(
                f"`fn`={self.fn!r} must be a dotted import path such as "
                "'maye_pl.rewards.accuracy_reward'"
            )
        number = isinstance(self.weight, (int, float)) and not isinstance(self.weight, bool)
        if not number or not math.isfinite(self.weight):
            problems.append(f"`weight`={self.weight!r} must be a finite number")
        if self.name is not None and (not isinstance(self.name, str) or not self.name.strip()):
            problems.append(
                f"`name`={self.name!r} must be a non-empty string, or None for the function's name"
            )
        if self.kwargs is not None and not isinstance(self.kwargs, dict):
            problems.append(f"`kwargs`={self.kwargs!r} must be a mapping of keyword arguments, or None")
        if problems:
            raise ValueError("RewardTerm: " + "; ".join(problems) + ".")

    @property
    def display_name(self) -> str:
        """``name``, or the last component of ``fn``."""
        return self.name if self.name is not None else self.fn.rsplit(".", 1)[-1]


def default_rewards(judge: str = "math_verify") -> list[RewardTerm]:
    """The paper's rewards: accuracy under ``judge`` (weight 1) + language penalty (weight 1); format is off.

    A function, so every caller gets its own list (no shared mutable default).
    """
    return [
        RewardTerm(ACCURACY_REWARDS[judge], 1.0, "accuracy"),
        RewardTerm("maye_pl.rewards.language_reward", 1.0, "language"),
    ]


def resolve_rewards(terms: list[RewardTerm]) -> list[tuple[str, float, RewardFn]]:
    """Import every term's ``fn`` (each path once) as ``(name, weight, fn)`` triples.

    Raises:
        ValueError: listing every term that does not import, is not callable, or repeats a
            name, with its index, its path and the fix.
    """
    imported: dict[str, RewardFn] = {}
    problems: list[str] = []
    resolved: list[tuple[str, float, RewardFn]] = []
    seen_names: dict[str, int] = {}
    for index, term in enumerate(terms):
        where = f"rewards[{index}] (fn={term.fn!r})"
        name = term.display_name
        if name in seen_names:
            problems.append(
                f"{where}: name {name!r} is already used by rewards[{seen_names[name]}]; "
                "give one of them another `name`"
            )
        seen_names.setdefault(name, index)
        if term.fn not in imported:
            try:
                imported[term.fn] = _import_callable(term.fn)
            except (ImportError, AttributeError, TypeError) as error:
                problems.append(
                    f"{where}: {error}; fix: set `fn` to the dotted import path of "
                    f"{_REWARD_CONTRACT}, e.g. 'maye_pl.rewards.accuracy_reward'"
                )
                continue
        fn = imported[term.fn]
        if term.kwargs:
            try:
                inspect.signature(fn).bind_partial([], [], **term.kwargs)
            except TypeError as error:
                problems.append(f"{where}: `kwargs`={term.kwargs} do not fit its signature ({error}); fix the names")
                continue
            fn = functools.partial(fn, **term.kwargs)
        resolved.append((name, float(term.weight), fn))
    if problems:
        raise ValueError("resolve_rewards:\n  " + "\n  ".join(problems))
    return resolved


def _import_callable(path: str) -> RewardFn:
    """The object at ``path``: the longest importable module prefix, then attributes."""
    parts = path.strip().split(".")
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            target = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name is not None and module_name.startswith(error.name):
                continue  # this prefix is not a module; try a shorter one
            raise ImportError(f"importing module {module_name!r} failed: {error}") from error
        for attribute in parts[split:]:
            if not hasattr(target, attribute):
                owner = getattr(target, "__name__", repr(target))
                raise AttributeError(f"{owner!r} has no attribute {attribute!r}")
            target = getattr(target, attribute)
        if not callable(target):
            raise TypeError(f"{path!r} is a {type(target).__name__}, not callable")
        return target
    raise ImportError(f"no module found in {path!r}")


def score_responses(
    rewards: list[tuple[str, float, RewardFn]], responses: list[str], samples: list[dict]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted total and each component, unweighted, by name.

    Args:
        rewards: ``resolve_rewards`` output.
        responses: B response texts.
        samples: B data records, ``samples[i]`` for ``responses[i]``.

    Returns:
        total (B,) float32 = sum of weight * component; {name: component (B,) float32}.

    Raises:
        TypeError: naming the reward that returned something other than a (B,) float32 tensor.
    """
    batch = len(responses)
    total = torch.zeros(batch, dtype=torch.float32)  # (B,)
    components: dict[str, torch.Tensor] = {}
    for name, weight, fn in rewards:
        value = fn(responses, samples)
        if not isinstance(value, torch.Tensor):
            got = type(value).__name__
        elif value.shape != (batch,) or value.dtype != torch.float32:
            got = f"a Tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
        else:
            got = None
        if got is not None:
            raise TypeError(
                f"reward {name!r} ({getattr(fn, '__qualname__', fn)}) returned {got} for {batch} "
                f"responses; it must return a Tensor of shape ({batch},) and dtype float32 "
                "(one score per response; use torch.tensor(scores, dtype=torch.float32))."
            )
        components[name] = value
        total = total.to(value.device) + weight * value  # (B,)
    return total, components
