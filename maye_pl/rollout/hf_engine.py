"""The transformers ``generate`` rollout engine: the fallback without vLLM, and the reference.

Same contract and same sampling rules as ``VLLMEngine``: prompts are the chat-template text with one
placeholder per image, the vision special tokens are never sampled, stop tokens come from the
generation config and tokenizer, and ``Rollout.logprobs`` are taken from the distribution
actually sampled from (after temperature, top-p and the vision-token suppression).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from maye_pl.models.adapters import adapter_for
from maye_pl.models.loading import stop_token_ids
from maye_pl.rollout.seeds import sampling_seed
from maye_pl.types import NamedTensors, ResolvedHandle, Rollout, RolloutRequest, SamplingConfig


class HFEngine:
    """A ``RolloutEngine`` over an in-process HF model (batched, left-padded ``generate``).

    Args:
        model: an HF vision-language causal LM; the engine generates with it as is (same device).
        processor: its processor (tokenizer + image processor).
    """

    def __init__(self, model: nn.Module, processor) -> None:
        self.model = model
        self.processor = processor
        tokenizer = processor.tokenizer
        self.stop_ids = stop_token_ids(getattr(model, "generation_config", None), tokenizer)
        self.banned_ids = adapter_for(model).vision_token_ids(tokenizer)
        self.pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        )

    def submit(
        self, requests: list[RolloutRequest], sampling: SamplingConfig, *, policy_version: int = 0
    ) -> ResolvedHandle:
        """Generate now (the model shares the trainer's process and device) and return the result
        as an already resolved handle."""
        start = time.perf_counter()
        rollouts = self.generate(requests, sampling, policy_version=policy_version)
        return ResolvedHandle(rollouts, engine_seconds=time.perf_counter() - start)

    @torch.no_grad()
    def generate(
        self, requests: list[RolloutRequest], sampling: SamplingConfig, *, policy_version: int = 0
    ) -> list[Rollout]:
        """Sample ``sampling.n`` responses per request; B*G rollouts, request-major."""
        if not requests:
            return []
        device = next(self.model.parameters()).device
        images = [image for request in requests for image in request.images]
        batch = self.processor(
            text=[request.prompt for request in requests],
            images=images or None,
            padding=True,
            padding_side="left",
            return_tensors="pt",
            return_mm_token_type_ids=True,
        ).to(device)
        greedy = sampling.temperature == 0
        options = {
            "do_sample": not greedy,
            "max_new_tokens": sampling.max_tokens,
            "num_return_sequences": sampling.n,
            "eos_token_id": self.stop_ids,
            "pad_token_id": self.pad_id,
            "suppress_tokens": self.banned_ids,
            # No checkpoint sampling defaults (Qwen ships top_k=1, repetition_penalty=1.05 ...).
            "repetition_penalty": 1.0,
            "output_scores": True,
            "return_dict_in_generate": True,
        }
        if not greedy:
            options.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        was_training = self.model.training
        self.model.eval()
        try:
            if sampling.seed is None:
                out = self.model.generate(**batch, **options)
            else:
                # A private RNG stream: seeding must not reset the trainer's global generator. One
                # generate call draws all rows from one generator: seeded with the call's first
                # stream (so, unlike vLLM's, its rows depend on how requests are split into calls).
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(sampling_seed(sampling.seed, sampling.step, sampling.request_offset, 0))
                    out = self.model.generate(**batch, **options)
        finally:
            self.model.train(was_training)
        return self._rollouts(batch, out, sampling, policy_version)

    def _rollouts(self, batch, out, sampling: SamplingConfig, policy_version: int) -> list[Rollout]:
        P = batch["input_ids"].shape[1]
        responses = out.sequences[:, P:]  # (B*G, L), request-major
        if sampling.logprobs and out.scores:
            scores = torch.stack(out.scores, dim=1).float()  # (B*G, L, V): processed logits
            logprobs = (
                torch.log_softmax(scores, dim=-1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)
            )  # (B*G, L)
        else:
            logprobs = None
        stop = torch.tensor(self.stop_ids, device=responses.device)
        rollouts = []
        for row in range(responses.shape[0]):
            request_row = row // sampling.n
            prompt_ids = batch["input_ids"][request_row][
                batch["attention_mask"][request_row].bool()
            ]
            hits = torch.isin(responses[row], stop).nonzero()
            stopped = len(hits) > 0
            length = int(hits[0]) + 1 if stopped else responses.shape[1]  # the stop token is kept
            token_ids = responses[row, :length].tolist()
            rollouts.append(
                Rollout(
                    token_ids=token_ids,
                    text=self.processor.tokenizer.decode(token_ids, skip_special_tokens=True),
                    finish_reason="stop" if stopped else "length",
                    logprobs=logprobs[row, :length].tolist() if logprobs is not None else None,
                    prompt_token_ids=prompt_ids.tolist(),
                    policy_version=policy_version,
                )
            )
        return rollouts

    @contextmanager
    def weight_update(self) -> Iterator[Callable[[NamedTensors], None]]:
        """One weight-update transaction; ``push(bucket)`` copies each tensor into the parameter
        of that (transformers) name. Nothing is cached, so there is nothing to finish."""
        params = dict(self.model.named_parameters())

        @torch.no_grad()
        def push(bucket: NamedTensors) -> None:
            for name, tensor in bucket:
                if name not in params:
                    raise KeyError(
                        f"HFEngine.update_weights: {name!r} is not a parameter of "
                        f"{type(self.model).__name__}; send the policy's own named_parameters() names."
                    )
                params[name].copy_(tensor)

        yield push

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy tensors into the model's parameters by (transformers) name."""
        with self.weight_update() as push:
            for name, tensor in named_tensors:
                push([(name, tensor)])

    def shutdown(self) -> None:
        """Nothing to release: the model belongs to the caller."""
