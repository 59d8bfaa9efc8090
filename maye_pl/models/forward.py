"""The trainer's view of prompt + response: batch them for the policy and score the response tokens.

Notation: N rows (one per sampled response, request-major: B prompts x G samples), P prompt tokens
(after left padding), T response tokens (after right padding), I images in the batch.

Layout of one row of ``input_ids`` (P + T columns)::

    [pad ... pad | prompt tokens (image placeholders expanded) | response tokens | pad ... pad]
    <--------------------- P ---------------------------------><------------- T ------------->

so the logits at columns ``P-1 ... P+T-2`` score the response tokens at ``P ... P+T-1``.

The prompt tokens are exactly what the rollout engine sampled from (vLLM gets the same chat
template text and images and expands the placeholders with the same processor), so the trainer
scores the responses under the prompt they were sampled from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor, nn

from maye_pl.models.adapters import ModelAdapter
from maye_pl.rl.logprobs import token_entropy, token_logprobs
from maye_pl.types import RolloutRequest


@dataclass
class PolicyInputs:
    """Model inputs for N prompt+response rows, plus where the responses are.

    Rows are request-major (request i's G samples are rows ``i*G ... i*G+G-1``).
    """

    input_ids: Tensor
    """(N, P+T) long: left-padded prompt, then the right-padded response."""
    attention_mask: Tensor
    """(N, P+T) long: 1 on prompt and response tokens, 0 on padding."""
    mm_token_type_ids: Tensor
    """(N, P+T) long: 0 text, 1 image, 2 video (the processor's; the adapter passes it on)."""
    pixel_values: Tensor | None
    """(sum over images of t*h*w patches, C*temporal*patch*patch) float, images in row order."""
    image_grid_thw: Tensor | None
    """(I, 3) long: (t, h, w) patch grid of each image, in row order."""
    images_per_row: Tensor
    """(N,) long: how many of the images belong to each row (to slice rows apart)."""
    response_ids: Tensor
    """(N, T) long: response tokens, right-padded with the pad id."""
    response_mask: Tensor
    """(N, T) bool: True on real response tokens."""
    prompt_length: int
    """P: the response starts at this column of ``input_ids``."""
    adapter: ModelAdapter
    """The model family's adapter: which of these the forward takes, and pixel rows per image."""

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> PolicyInputs:
        """Move every tensor to ``device``."""
        moved = {
            f.name: (
                value.to(device) if isinstance(value := getattr(self, f.name), Tensor) else value
            )
            for f in fields(self)
        }
        return PolicyInputs(**moved)


def _encode_prompt(processor, request: RolloutRequest) -> dict[str, Tensor]:
    """Tokenize one prompt with its images: the processor expands each placeholder to its tokens."""
    encoded = processor(
        text=[request.prompt],
        images=list(request.images) or None,
        return_tensors="pt",
        return_mm_token_type_ids=True,
    )
    return encoded


def build_policy_inputs(
    processor,
    requests: Sequence[RolloutRequest],
    response_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    *,
    adapter: ModelAdapter,
) -> PolicyInputs:
    """Batch N (request, response) rows for the policy forward.

    Args:
        processor: the policy's HF processor (e.g. ``Qwen2_5_VLProcessor``).
        requests: (N,) one request per row; repeat a request G times for its G samples. Repeats of
            the same object are tokenized once.
        response_ids: (N,) lists of sampled token ids (T_i,), stop token included if sampled.
        pad_token_id: id written into padding (masked out; any valid id works).
        adapter: the model family's (``adapter_for(model_path)``): its vision tokens may not
            appear in a response, and it slices and feeds the vision inputs.

    Returns:
        ``PolicyInputs`` with prompts left-padded to P and responses right-padded to T.
    """
    if len(requests) != len(response_ids):
        raise ValueError(
            f"build_policy_inputs: {len(requests)} requests but {len(response_ids)} responses; "
            "pass one request per response row (repeat a request G times for its G samples)."
        )
    vision_ids = set(adapter.vision_token_ids(processor.tokenizer))
    for row, ids in enumerate(response_ids):
        if bad := vision_ids.intersection(ids):
            raise ValueError(
                f"build_policy_inputs: response row {row} contains vision placeholder token id(s) "
                f"{sorted(bad)}; the model cannot score them (no image behind them). The rollout "
                "engine must suppress vision tokens (both maye_pl engines do)."
            )

    encoded: dict[int, dict[str, Tensor]] = {}
    for request in requests:
        if id(request) not in encoded:
            encoded[id(request)] = _encode_prompt(processor, request)
    rows = [encoded[id(request)] for request in requests]

    P = max(row["input_ids"].shape[1] for row in rows)
    T = max((len(ids) for ids in response_ids), default=0)
    N = len(rows)
    input_ids = torch.full((N, P + T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((N, P + T), dtype=torch.long)
    mm_token_type_ids = torch.zeros((N, P + T), dtype=torch.long)
    response_mask = torch.zeros((N, T), dtype=torch.bool)
    for n, (row, ids) in enumerate(zip(rows, response_ids)):
        length = row["input_ids"].shape[1]
        input_ids[n, P - length : P] = row["input_ids"][0]
        attention_mask[n, P - length : P] = 1
        mm_token_type_ids[n, P - length : P] = row["mm_token_type_ids"][0]
        input_ids[n, P : P + len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
        attention_mask[n, P : P + len(ids)] = 1
        response_mask[n, : len(ids)] = True

    with_images = [row for row in rows if "pixel_values" in row]
    return PolicyInputs(
        input_ids=input_ids,
        attention_mask=attention_mask,
        mm_token_type_ids=mm_token_type_ids,
        pixel_values=(
            torch.cat([row["pixel_values"] for row in with_images]) if with_images else None
        ),
        image_grid_thw=(
            torch.cat([row["image_grid_thw"] for row in with_images]) if with_images else None
        ),
        images_per_row=torch.tensor(
            [len(row["image_grid_thw"]) if "pixel_values" in row else 0 for row in rows]
        ),
        response_ids=input_ids[:, P:].clone(),  # (N, T)
        response_mask=response_mask,
        prompt_length=P,
        adapter=adapter,
    )


def select_rows(inputs: PolicyInputs, rows: slice | Sequence[int] | Tensor) -> PolicyInputs:
    """The sub-batch of ``rows`` (a minibatch or a forward chunk), vision tensors re-sliced.

    ``pixel_values`` rows belong to images through ``image_grid_thw`` (the adapter's patches per
    image) and images to rows through ``images_per_row``.
    """
    index = (
        torch.arange(inputs.num_rows)[rows] if not isinstance(rows, Tensor) else rows.long().cpu()
    )
    index = index.reshape(-1)
    pixel_values = image_grid_thw = None
    if inputs.image_grid_thw is not None:
        image_start = torch.cumsum(inputs.images_per_row, 0) - inputs.images_per_row  # (N,)
        image_index = torch.cat(
            [
                torch.arange(image_start[r], image_start[r] + inputs.images_per_row[r])
                for r in index.tolist()
            ]
            or [torch.zeros(0, dtype=torch.long)]
        )
        patches = inputs.adapter.patches_per_image(inputs.image_grid_thw)  # (I,)
        patch_start = torch.cumsum(patches, 0) - patches  # (I,)
        patch_index = torch.cat(
            [
                torch.arange(patch_start[i], patch_start[i] + patches[i])
                for i in image_index.tolist()
            ]
            or [torch.zeros(0, dtype=torch.long)]
        )
        if len(image_index):
            image_grid_thw = inputs.image_grid_thw[image_index.to(inputs.image_grid_thw.device)]
            pixel_values = inputs.pixel_values[patch_index.to(inputs.pixel_values.device)]
    device = inputs.input_ids.device
    index = index.to(device)
    return replace(
        inputs,
        input_ids=inputs.input_ids[index],
        attention_mask=inputs.attention_mask[index],
        mm_token_type_ids=inputs.mm_token_type_ids[index],
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
        images_per_row=inputs.images_per_row[index.to(inputs.images_per_row.device)],
        response_ids=inputs.response_ids[index],
        response_mask=inputs.response_mask[index],
    )


def _trim(inputs: PolicyInputs) -> PolicyInputs:
    """Drop columns that are padding in every row (a chunk's own P and T can be shorter)."""
    P, T = inputs.prompt_length, inputs.response_ids.shape[1]
    used_prompt = inputs.attention_mask[:, :P].any(0).nonzero()
    first = int(used_prompt[0]) if len(used_prompt) else P
    used_response = inputs.response_mask.any(0).nonzero()
    t = int(used_response[-1]) + 1 if len(used_response) else 0
    if first == 0 and t == T:
        return inputs
    columns = slice(first, P + t)
    return replace(
        inputs,
        input_ids=inputs.input_ids[:, columns],
        attention_mask=inputs.attention_mask[:, columns],
        mm_token_type_ids=inputs.mm_token_type_ids[:, columns],
        response_ids=inputs.response_ids[:, :t],
        response_mask=inputs.response_mask[:, :t],
        prompt_length=P - first,
    )


def _chunk_scores(
    model: nn.Module,
    chunk: PolicyInputs,
    temperature: float,
    return_entropy: bool,
    banned_token_ids: Sequence[int] | None,
    logits_chunk_size: int | None,
    maye_position_ids: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """(n, T) logprobs (and entropies) of one chunk, zero on response padding."""
    trimmed = _trim(chunk)
    n, T = chunk.response_ids.shape
    logprobs = torch.zeros((n, T), dtype=torch.float32, device=chunk.input_ids.device)
    entropy = torch.zeros_like(logprobs) if return_entropy else None
    t = trimmed.response_ids.shape[1]
    if t == 0:
        return logprobs, entropy
    # MAYE's trainer positions (switch): a 1-D count over the mask, given to every M-RoPE section.
    attention = trimmed.attention_mask
    position_ids = (attention.cumsum(-1) - 1) * attention if maye_position_ids else None  # (n, P+t); None: M-RoPE
    out = model(
        position_ids=position_ids,
        input_ids=trimmed.input_ids,
        attention_mask=trimmed.attention_mask,
        **trimmed.adapter.forward_kwargs(trimmed),
        use_cache=False,
        logits_to_keep=t + 1,  # the lm_head runs on the response positions only
    )
    logits = out.logits[:, :-1]  # (n, t, V): column P-1+j scores response token j
    if banned_token_ids:
        # The engine samples with these tokens banned: score the same distribution it sampled.
        # In place: the lm_head's backward does not need its output, and a copy would double it.
        logits.index_fill_(-1, torch.as_tensor(banned_token_ids, device=logits.device), float("-inf"))
    mask = trimmed.response_mask
    logprobs[:, :t] = token_logprobs(
        logits, trimmed.response_ids, temperature, logits_chunk_size
    ).masked_fill(~mask, 0.0)
    if entropy is not None:
        with torch.no_grad():  # a statistic to log: no autograd graph over (n, t, V) tensors
            entropy[:, :t] = token_entropy(logits, temperature, logits_chunk_size).masked_fill(~mask, 0.0)
    return logprobs, entropy


def response_logprobs(
    model: nn.Module,
    inputs: PolicyInputs,
    *,
    temperature: float,
    forward_batch_size: int | None = None,
    return_entropy: bool = False,
    banned_token_ids: Sequence[int] | None = None,
    logits_chunk_size: int | None = 256,
    maye_position_ids: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probabilities of the response tokens under ``softmax(logits / temperature)``.

    Runs the model on ``forward_batch_size`` rows at a time (None = all N at once); each chunk
    drops its all-padding columns first. Differentiable when called with grad enabled.

    Args:
        model: an HF vision-language causal LM (e.g. ``Qwen2_5_VLForConditionalGeneration``).
        inputs: from ``build_policy_inputs``, on the model's device.
        temperature: the sampling temperature the responses were drawn at.
        forward_batch_size: rows per forward pass, to bound activation memory.
        return_entropy: also return the entropy of the full tempered distribution per token
            (no gradient: it is logged, not optimised).
        banned_token_ids: tokens the sampler never emits (the vision special tokens): their
            logits are set to -inf, so the scores are those of the distribution that was sampled.
        logits_chunk_size: response positions per fp32 log-softmax chunk (``token_logprobs``):
            bounds the temporaries to rows * chunk * V fp32 values (None = all positions).
        maye_position_ids: MAYE's 1-D positions instead of the model's M-RoPE ones (image tokens
            then sit at consecutive positions, unlike in the engine); for reproducing MAYE only.

    Returns:
        (N, T) fp32 logprobs, 0 on padding; with ``return_entropy`` a tuple (logprobs, entropy),
        both (N, T).
    """
    if forward_batch_size is not None and forward_batch_size < 1:
        raise ValueError(
            f"response_logprobs: forward_batch_size={forward_batch_size} must be a positive int, "
            "or None for all rows in one forward pass."
        )
    N = inputs.num_rows
    step = forward_batch_size or max(N, 1)
    scores = [
        _chunk_scores(
            model, select_rows(inputs, slice(s, s + step)), temperature, return_entropy, banned_token_ids,
            logits_chunk_size, maye_position_ids,
        )
        for s in range(0, N, step)
    ]
    logprobs = (
        torch.cat([lp for lp, _ in scores])
        if scores
        else torch.zeros_like(inputs.response_ids, dtype=torch.float32)
    )
    if not return_entropy:
        return logprobs  # (N, T)
    entropy = torch.cat([ent for _, ent in scores]) if scores else torch.zeros_like(logprobs)
    return logprobs, entropy  # (N, T), (N, T)
