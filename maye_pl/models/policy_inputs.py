"""The trainer's view of prompt + response: rows batched for the policy, and sub-batches of them.

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
from torch import Tensor

from maye_pl.models.adapters import ModelAdapter
from maye_pl.models.micro_batches import Lengths
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
    prompt_index: Tensor
    """(N,) long: rows with equal values continue the same prompt (a request's G samples)."""
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

    def lengths(self) -> Lengths:
        """Each row's prompt and response tokens (padding excluded), for micro-batch planning."""
        return Lengths(
            prompt=self.attention_mask[:, : self.prompt_length].sum(1).cpu(),
            response=self.response_mask.sum(1).cpu(),
            prompt_index=self.prompt_index.cpu(),
        )

    def to(self, device: torch.device | str) -> PolicyInputs:
        """Move every tensor to ``device``."""
        moved = {
            f.name: (
                value.to(device) if isinstance(value := getattr(self, f.name), Tensor) else value
            )
            for f in fields(self)
        }
        return PolicyInputs(**moved)


def encode_prompt(processor, request: RolloutRequest) -> dict[str, Tensor]:
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
            encoded[id(request)] = encode_prompt(processor, request)
    rows = [encoded[id(request)] for request in requests]
    prompt_slot = {key: slot for slot, key in enumerate(encoded)}  # request → its first appearance

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
        prompt_index=torch.tensor([prompt_slot[id(request)] for request in requests], dtype=torch.long),
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
        prompt_index=inputs.prompt_index[index.to(inputs.prompt_index.device)],
        response_ids=inputs.response_ids[index],
        response_mask=inputs.response_mask[index],
    )


def trim_padding(inputs: PolicyInputs) -> PolicyInputs:
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
