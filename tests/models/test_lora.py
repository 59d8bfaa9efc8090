"""LoRA on the tiny Qwen2.5-VL (``maye_pl.models.lora``): which layers get adapters and what trains,
the reference as the adapters switched off, the engine's merged weights and the export.

The adapters' B starts at 0 (the adapted model IS the base then), so the checks that need the
adapters to matter first give B random values. The merge is checked against peft's own
``merge_and_unload`` and against the adapted model's logits.
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from maye_pl.export import export_hf
from maye_pl.models.loading import build_policy_and_reference, freeze_modules, load_policy
from maye_pl.models.lora import LoraArgs, adapters_disabled, apply_lora, lora_layers, merge_adapters
from maye_pl.strategies.weight_sync import WeightSyncPlan, iter_full_parameters, sync_weights

LLM_LAYERS = [f"model.language_model.layers.{i}.{name}" for i in range(2) for name in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def _adapted(model_dir, args=LoraArgs(r=4, alpha=8.0), **train):
    torch.manual_seed(0)
    parts = {"train_vit": False, "train_connector": False, "train_llm": True, **train}
    policy, reference = build_policy_and_reference(
        model_dir, dtype="float32", attn_implementation="sdpa", gradient_checkpointing=False, with_reference=False,
        on_meta=False, lora=args, **parts)
    assert reference is None
    return policy


def _randomize_adapters(model) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            weight = layer.lora_B["default"].weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.05)


def _logits(model, processor):
    inputs = processor(text=["<|im_start|>user\nSolve 3x + 7 = 22.<|im_end|>\n<|im_start|>assistant\n"],
                       return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits  # (1, L, V)


def test_adapters_go_on_the_chosen_layers_and_only_they_train(tiny_model_dir):
    policy = _adapted(tiny_model_dir)
    assert [name for name, _ in lora_layers(policy)] == LLM_LAYERS  # every decoder linear layer, no lm_head
    trainable = [name for name, param in policy.named_parameters() if param.requires_grad]
    assert trainable and all(".lora_A.default." in name or ".lora_B.default." in name for name in trainable)
    assert len(trainable) == 2 * len(LLM_LAYERS)
    # r=4 on (64 -> 64) q_proj: A (4, 64), B (64, 4).
    q_proj = dict(lora_layers(policy))[LLM_LAYERS[0]]
    assert q_proj.lora_A["default"].weight.shape == (4, 64) and q_proj.lora_B["default"].weight.shape == (64, 4)
    assert q_proj.scaling["default"] == 2.0  # alpha / r

    # Leaf names pick layers; a part trained fully (the connector) keeps training beside the adapters.
    policy = _adapted(tiny_model_dir, LoraArgs(r=2, target_modules=("q_proj", "v_proj", "qkv"), parts=("llm", "vit")),
                      train_vit=True, train_connector=True)
    names = [name for name, _ in lora_layers(policy)]
    assert names == [f"model.visual.blocks.{i}.attn.qkv" for i in range(2)] + [n for n in LLM_LAYERS if n.endswith(("q_proj", "v_proj"))]
    assert {name.split(".")[2] for name, p in policy.named_parameters() if p.requires_grad and "lora_" not in name} == {"merger"}

    with pytest.raises(ValueError, match=r"`model.lora.target_modules`=\('qkv',\) matches no linear layer of \['llm'\]; "
                                         r"their layers are named \['down_proj', 'gate_proj', .*'v_proj'\]"):
        _adapted(tiny_model_dir, LoraArgs(r=2, target_modules=("qkv",)))


def test_lora_args_name_every_problem():
    problems = LoraArgs(r=4, alpha=0, dropout=1.0, parts=("vit", "head"), target_modules=()).problems(
        trained={"llm": True, "vit": False})
    assert problems == [
        "`model.lora.alpha`=0 must be > 0 (the adapters' scale is alpha / r).",
        "`model.lora.dropout`=1.0 must lie in [0, 1).",
        "`model.lora.parts`=['vit', 'head'] must be a non-empty subset of ['llm', 'vit'].",
        "`model.lora.parts` includes 'vit' but `model.train_vit` is false; set it true or drop 'vit'.",
        "`model.lora.target_modules`=[] selects no layer; list leaf names (e.g. [q_proj, v_proj]) or null.",
    ]
    assert LoraArgs(r=-1).problems() == ["`model.lora.r`=-1 must be >= 0 (0: no adapters)."]
    assert LoraArgs().problems() == [] and not LoraArgs().enabled


def test_reference_merged_weights_and_export(tiny_model_dir, tiny_processor, tmp_path):
    base = load_policy(tiny_model_dir)
    policy = _adapted(tiny_model_dir)
    assert torch.equal(_logits(policy, tiny_processor), _logits(base, tiny_processor))  # B = 0: the base
    _randomize_adapters(policy)
    adapted = _logits(policy, tiny_processor)
    assert (adapted - _logits(base, tiny_processor)).abs().max() > 1e-3  # the adapters matter now

    # The reference: the same model with its adapters off is the base, exactly; they come back on.
    with adapters_disabled(policy) as reference:
        assert torch.equal(_logits(reference, tiny_processor), _logits(base, tiny_processor))
    assert torch.equal(_logits(policy, tiny_processor), adapted)
    assert sum(p.requires_grad for p in policy.parameters()) == 2 * len(LLM_LAYERS)

    # What the engine loads: the plain model's names, W + s·B@A where adapted (peft's own merge agrees).
    streamed = {name: t.clone() for bucket in iter_full_parameters(policy, bucket_bytes=1 << 16) for name, t in bucket}
    merged_by_peft = _peft_merged(policy)
    assert list(streamed) == [name for name, _ in base.named_parameters()]
    assert max((streamed[k] - merged_by_peft[k]).abs().max().item() for k in streamed) <= 1e-6
    plain = load_policy(tiny_model_dir)
    plain.load_state_dict(streamed)
    assert (_logits(plain, tiny_processor) - adapted).abs().max() <= 1e-5  # the engine samples the trained policy

    # Frozen tensors go once; the merged layers every sync (their W is frozen, their adapters train).
    plan, pushed = WeightSyncPlan(), []
    first = sync_weights(policy, pushed.extend, bucket_bytes=1 << 16, plan=plan)
    second = sync_weights(policy, pushed.extend, bucket_bytes=1 << 16, plan=plan)
    assert first.num_tensors == len(streamed) and second.num_tensors == len(LLM_LAYERS)

    # The export merges: a checkpoint's policy tensors (adapters included) -> a plain HF directory.
    state = {f"policy.{name}": tensor for name, tensor in policy.state_dict().items()}
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"lora": asdict(LoraArgs(r=4, alpha=8.0))}}, checkpoint)
    exported = load_policy(export_hf(checkpoint, tmp_path / "hf", base_model_dir=tiny_model_dir))
    assert (_logits(exported, tiny_processor) - adapted).abs().max() <= 1e-5
    with pytest.raises(ValueError, match=r"holds LoRA adapters but its hyperparameters record no `lora` with r > 0"):
        torch.save({"state_dict": state, "hyper_parameters": {}}, checkpoint)
        export_hf(checkpoint, tmp_path / "hf2", base_model_dir=tiny_model_dir)


def _peft_merged(policy) -> dict[str, torch.Tensor]:
    """peft's merge of a copy of ``policy``: each LoRA layer merged and unwrapped in place."""
    copied = copy.deepcopy(policy)
    for name, layer in list(lora_layers(copied)):
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(copied.get_submodule(parent), child, layer.get_base_layer())
    return {name: tensor.detach() for name, tensor in copied.state_dict().items()}


def test_merge_adapters_by_hand():
    # W (2, 2) = I, A (1, 2) = [1, 2], B (2, 1) = [[3], [4]], s = 0.5: W + s·B@A = I + 0.5·[[3, 6], [4, 8]].
    state = {"layer.weight": torch.eye(2), "layer.bias": torch.ones(2),
             "layer.lora_A.default.weight": torch.tensor([[1.0, 2.0]]),
             "layer.lora_B.default.weight": torch.tensor([[3.0], [4.0]])}
    merged = merge_adapters(state, scaling=0.5)
    assert merged.keys() == {"layer.weight", "layer.bias"}
    assert torch.equal(merged["layer.weight"], torch.tensor([[2.5, 3.0], [2.0, 5.0]]))
    with pytest.raises(KeyError, match="layer.lora_A.default.weight has no base weight layer.weight"):
        merge_adapters({k: v for k, v in state.items() if k != "layer.weight"}, 0.5)


def test_apply_lora_draws_the_same_adapters_from_the_run_seed(tiny_model_dir):
    # The one-process build and rank 0's re-application under FSDP2 draw A from torch.initial_seed(),
    # whatever the global generator did in between.
    first = _adapted(tiny_model_dir)
    torch.rand(100)
    model = load_policy(tiny_model_dir)
    freeze_modules(model, train_vit=False, train_connector=False, train_llm=True)
    assert apply_lora(model, LoraArgs(r=4, alpha=8.0)) == LLM_LAYERS
    a = [layer.lora_A["default"].weight for _, layer in lora_layers(first)]
    b = [layer.lora_A["default"].weight for _, layer in lora_layers(model)]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and a[0].abs().sum() > 0


# ------------------------------------------------------------------------------ two FSDP2 ranks


def _fsdp2_worker(rank: int, init_file: str, model_dir: str, out_dir: str) -> None:
    """Rank ``rank`` of 2: the LoRA policy built on the meta device, sharded with activation
    checkpointing, loaded by rank 0; one SGD step on its half of the batch; what it saw to a file."""
    import sys

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "strategies"))
    from fsdp2_case import make_global_batch, rank_slice, response_nll

    from maye_pl.models.loading import load_pretrained_weights
    from maye_pl.strategies.fsdp2 import shard_hf_model

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    policy, batch = _lora_step_inputs(model_dir, on_meta=True)
    shard_hf_model(policy, init_device_mesh("cpu", (2,)), activation_checkpointing=True)
    load_pretrained_weights(policy, torch.device("cpu"))
    local = rank_slice(make_global_batch(model_dir), rank, 2)
    with torch.no_grad(), adapters_disabled(policy) as reference:
        reference_loss = response_nll(reference, local).item()
    merged = _one_lora_step(policy, local, response_nll)
    sharded = all(isinstance(p, DTensor) for p in policy.parameters())
    torch.save({"merged": merged, "reference_loss": reference_loss, "sharded": sharded,
                "wrapped": any("_checkpoint_wrapped_module" in n for n, _ in policy.named_parameters())},
               f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def _lora_step_inputs(model_dir: str, on_meta: bool):
    torch.manual_seed(0)  # LoRA's A comes from the run's seed, in one process and on rank 0 alike
    policy, _ = build_policy_and_reference(
        model_dir, dtype="float32", attn_implementation="sdpa", train_vit=False, train_connector=False,
        train_llm=True, gradient_checkpointing=False, with_reference=False, on_meta=on_meta,
        lora=LoraArgs(r=4, alpha=8.0))
    return policy, None


def _one_lora_step(policy, batch, loss_fn) -> dict[str, torch.Tensor] | None:
    """Two SGD steps on ``loss_fn`` (B moves off 0 in the first, A in the second); only adapters get
    gradients; the merged weights the engine would load (None off rank 0)."""
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=1.0)
    for _ in range(2):
        optimizer.zero_grad()
        loss_fn(policy, batch).backward()
        assert all((p.grad is not None) == p.requires_grad for p in policy.parameters())
        optimizer.step()
    merged = {name: t.clone() for bucket in iter_full_parameters(policy, bucket_bytes=1 << 16) for name, t in bucket}
    return merged or None


@pytest.mark.slow
def test_two_fsdp2_ranks_train_lora_like_one_process(tiny_model_dir, tmp_path):
    """2 gloo ranks, FSDP2 units with activation checkpointing, rank 0 loading base + adapters: the
    adapters' steps and the merged weights streamed out of the shards equal one process's; the
    reference (adapters off) is the base on every rank."""
    import sys

    import torch.multiprocessing as mp

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "strategies"))
    from fsdp2_case import make_global_batch, response_nll

    mp.start_processes(_fsdp2_worker, args=(str(tmp_path / "init"), str(tiny_model_dir), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert all(r["sharded"] and r["wrapped"] for r in ranks) and ranks[1]["merged"] is None

    policy, _ = _lora_step_inputs(str(tiny_model_dir), on_meta=False)
    batch = make_global_batch(tiny_model_dir)
    single = _one_lora_step(policy, batch, response_nll)
    sharded = ranks[0]["merged"]
    assert sharded.keys() == single.keys()
    diff = max((sharded[k] - single[k]).abs().max().item() for k in single)
    base = load_policy(tiny_model_dir).state_dict()
    moved = max((single[k] - base[k]).abs().max().item() for k in single)
    print(f"max |sharded - single| merged = {diff:.3g}; max |merged - base| = {moved:.3g}")
    assert diff <= 1e-5 and moved > 100 * max(diff, 1e-7)
    # Each rank's reference loss on its half equals the base model's.
    from fsdp2_case import rank_slice

    with torch.no_grad():
        base_losses = [response_nll(load_policy(tiny_model_dir), rank_slice(batch, r, 2)).item() for r in range(2)]
    assert [r["reference_loss"] for r in ranks] == pytest.approx(base_losses, abs=1e-5)
