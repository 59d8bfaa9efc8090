"""MAYE's 1-D trainer positions (``response_logprobs(..., maye_position_ids=True)``) on the tiny model.

Proves what the switch changes: a text-only row has the same positions either way (M-RoPE gives all
three sections the count of non-padding tokens, which is MAYE's 1-D position), so its log-probs are
identical; an image row's vision tokens lose their (t, h, w) grid positions, so its response
log-probs move (the engine keeps M-RoPE: this is the mismatch the README reports).
"""

from __future__ import annotations

import torch

from maye_pl.models.adapters import adapter_for
from maye_pl.models.forward import build_policy_inputs, response_logprobs
from maye_pl.models.loading import load_policy


def test_switch_changes_image_rows_only(tiny_model_dir, tiny_processor, rollout_requests):
    policy = load_policy(tiny_model_dir).eval()
    responses = [[11, 12, 13, 14], [11, 12], [11, 12, 13]]  # rows: 4-token image, text only, 12-token image
    inputs = build_policy_inputs(tiny_processor, rollout_requests, responses, tiny_processor.tokenizer.pad_token_id,
                                 adapter=adapter_for(tiny_model_dir))
    with torch.no_grad():
        mrope = response_logprobs(policy, inputs, temperature=1.0)  # (3, 4)
        maye = response_logprobs(policy, inputs, temperature=1.0, maye_position_ids=True)  # (3, 4)
    torch.testing.assert_close(maye[1], mrope[1], atol=0, rtol=0)
    mask = inputs.response_mask
    for row in (0, 2):
        assert (maye[row] - mrope[row])[mask[row]].abs().max() > 1e-3
