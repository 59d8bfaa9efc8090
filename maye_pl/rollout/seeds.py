"""Sampling seeds: one stream per (run seed, generation step, request, sample), never shared within a run.

The old rule, ``seed + step + request * n + sample``, gave step s+1 the streams of step s shifted by
one sample: request 0's sample 0 at step 1 redrew request 0's sample 1 of step 0. ``sampling_seed``
packs (step, request) into 47 bits, scrambles them with a bijection keyed by the run seed, and puts
the sample index in the low 16 bits:

    seed = scramble_seed(pack(step, request)) * 2**16 + sample        (63 bits, non-negative)

so two different (step, request, sample) triples of one run always get different seeds (a
bijection of distinct packed values, then distinct low bits), and sample k of a request is the
request's seed + k. That is how vLLM seeds the k-th sample of an n > 1 request
(``vllm/v1/engine/parallel_sampling.py``: ``child_sampling_params.seed = seed + index``), so the
vLLM engine sends one n-sample request with the sample-0 seed and vLLM itself derives the rest.
"""

from __future__ import annotations

STEP_BITS, REQUEST_BITS, SAMPLE_BITS = 23, 24, 16
_MASK = (1 << (STEP_BITS + REQUEST_BITS)) - 1
_MASK64 = (1 << 64) - 1
# Odd multipliers (splitmix64's): multiplying by an odd number is a bijection modulo 2**k.
_MULTIPLIERS = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def sampling_seed(seed: int, step: int | None, request: int, sample: int) -> int:
    """The sampling seed of ``sample`` of ``request`` in the engine call of generation ``step``.

    Args:
        seed: the run's base seed (``rollout.seed``), any int.
        step: the generation step (0-based), or None for an evaluation call (the same streams at
            every evaluation, so epochs are compared on the same draws).
        request: the request's index in the call, 0 .. 2**24-1.
        sample: the sample's index within the request, 0 .. 2**16-1.

    Returns:
        A seed in [0, 2**63), distinct for distinct (step, request, sample) under one ``seed``.
    """
    step_field = 0 if step is None else step + 1
    limits = {"step": (step_field, STEP_BITS), "request": (request, REQUEST_BITS), "sample": (sample, SAMPLE_BITS)}
    for name, (value, bits) in limits.items():
        if not 0 <= value < 1 << bits:
            raise ValueError(
                f"sampling_seed: {name} index {value} is outside [0, 2**{bits}); seeds stay unique only "
                "within these limits (2**23-2 generation steps, 2**24 requests per call, 2**16 samples)."
            )
    packed = (step_field << REQUEST_BITS) | request
    return (_scramble(packed, seed) << SAMPLE_BITS) | sample


def _scramble(value: int, seed: int) -> int:
    """A bijection of [0, 2**47) chosen by ``seed``: xor a seed-derived key, then multiply-xorshift rounds."""
    value ^= _mix64(seed & _MASK64) & _MASK
    for multiplier, shift in zip(_MULTIPLIERS, (24, 21, 23)):
        value = (value * multiplier) & _MASK
        value ^= value >> shift
    return value


def _mix64(value: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit key from any seed."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * _MULTIPLIERS[1]) & _MASK64
    value = ((value ^ (value >> 27)) * _MULTIPLIERS[2]) & _MASK64
    return value ^ (value >> 31)
