"""Translating between maye_pl's rollout types and vLLM's: prompts, sampling parameters, outputs.

Runs in the engine host (``vllm_host``), next to ``vllm.LLM``. The rules both engines keep (see
``hf_engine``): the prompt is chat-template text with one placeholder per image, the vision
special tokens are never sampled, stop tokens come from the generation config and tokenizer, and
each sample's seed is ``sampling_seed(seed, step, request_offset + request, sample)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from maye_pl.rollout.seeds import sampling_seed
from maye_pl.types import Rollout, RolloutRequest, SamplingConfig


@dataclass(frozen=True)
class GenerationRules:
    """What every request of an engine shares, read from its checkpoint once at start."""

    stop_ids: list[int]
    """Token ids that end a response (generation config's eos, then the tokenizer's)."""
    banned: list[str]
    """The family's vision special tokens, as vLLM ``bad_words`` (never sampled)."""


def generation_rules(llm, model_path: str) -> GenerationRules:
    """The stop tokens and banned vision tokens of the model ``llm`` serves from ``model_path``."""
    from transformers import GenerationConfig

    from maye_pl.models.loading import stop_token_ids

    tokenizer = llm.get_tokenizer()
    try:
        generation_config = GenerationConfig.from_pretrained(model_path)
    except OSError:  # no generation_config.json: the tokenizer's eos only
        generation_config = None
    return GenerationRules(stop_token_ids(generation_config, tokenizer), vision_bad_words(tokenizer, model_path))


def vision_bad_words(tokenizer, model_path: str) -> list[str]:
    """The model family's vision special tokens as vLLM ``bad_words``, each checked to encode as its single id."""
    from maye_pl.models.adapters import adapter_for

    vocab = tokenizer.get_vocab()
    words = [token for token in adapter_for(model_path).vision_tokens if token in vocab]
    for word in words:
        if tokenizer.encode(word, add_special_tokens=False) != [vocab[word]]:
            raise ValueError(
                f"the tokenizer encodes {word!r} as "
                f"{tokenizer.encode(word, add_special_tokens=False)}, not as its id {vocab[word]}; "
                "register it as a special token (tokenizer_config.json added_tokens) so the engine "
                "can keep it out of sampled responses."
            )
    return words


def vllm_prompts(requests: list[RolloutRequest]) -> list[dict]:
    """vLLM prompt dicts: the chat-template text, and the images as multi-modal data."""
    # vLLM's processor expands each placeholder exactly as the trainer's processor does
    # (pre-expanded placeholder ids would be expanded a second time).
    return [
        (
            {"prompt": r.prompt, "multi_modal_data": {"image": r.images[0] if len(r.images) == 1 else list(r.images)}}
            if r.images
            else {"prompt": r.prompt}
        )
        for r in requests
    ]


def sampling_params(sampling: SamplingConfig, request_index: int, rules: GenerationRules):
    """vLLM ``SamplingParams`` of request ``request_index`` of a call (0-based within the call)."""
    from vllm import SamplingParams

    # The seed of the request's sample 0: vLLM gives sample k seed + k, which is sampling_seed's
    # stream of sample k, so no two samples of the run share a seed, even for identical prompts.
    seed = (
        None
        if sampling.seed is None
        else sampling_seed(sampling.seed, sampling.step, sampling.request_offset + request_index, 0)
    )
    return SamplingParams(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_tokens=sampling.max_tokens,
        seed=seed,
        logprobs=0 if sampling.logprobs else None,  # 0: only the sampled token's logprob
        stop_token_ids=rules.stop_ids,
        # Each vision token is a one-token "bad word": its logit is set to -inf at every step.
        # (A logit_bias is clamped to -100, which a large enough logit still overcomes.)
        bad_words=rules.banned,
    )


def to_rollouts(outputs) -> list[Rollout]:
    """vLLM ``RequestOutput``s -> B*G rollouts, request-major, samples in index order."""
    rollouts = []
    for output in outputs:
        for sample in sorted(output.outputs, key=lambda s: s.index):
            logprobs = (
                [step[token].logprob for step, token in zip(sample.logprobs, sample.token_ids)]
                if sample.logprobs is not None
                else None
            )
            rollouts.append(
                Rollout(
                    token_ids=list(sample.token_ids),
                    text=sample.text,
                    finish_reason=sample.finish_reason,
                    logprobs=logprobs,
                    prompt_token_ids=list(output.prompt_token_ids),
                )
            )
    return rollouts


def generate(llm, requests: list[RolloutRequest], sampling: SamplingConfig, rules: GenerationRules) -> tuple[list[Rollout], float]:
    """(B*G rollouts, seconds the engine spent on them): the trainer cannot time a queued request."""
    start = time.perf_counter()
    params = [sampling_params(sampling, i, rules) for i in range(len(requests))]
    rollouts = to_rollouts(llm.generate(vllm_prompts(requests), params, use_tqdm=False))
    return rollouts, time.perf_counter() - start
