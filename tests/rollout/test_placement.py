"""Engine placement: the device decision table for K engines of t GPUs each, the errors that name
the keys and the fix, and the environment an engine process gets."""

from __future__ import annotations

import pytest

from maye_pl.rollout.placement import engine_devices, engine_environment, engines_on_cpu


@pytest.mark.parametrize(
    ("requested", "engines", "tp", "trainer_devices", "visible_gpus", "allow_shared", "expected"),
    [
        ("auto", 1, 1, 1, 0, False, ["cpu"]),  # CPU machine
        ("auto", 2, 1, 2, 0, False, ["cpu", "cpu"]),  # CPU machine, 2 engine processes
        ("auto", 1, 1, 7, 8, False, ["cuda:7"]),  # MAYE's node: 7 trainer GPUs + the engine on the 8th
        ("auto", 2, 1, 6, 8, False, ["cuda:6", "cuda:7"]),  # 6+2
        ("auto", 4, 1, 4, 8, False, ["cuda:4", "cuda:5", "cuda:6", "cuda:7"]),  # 4+4
        ("auto", 2, 2, 4, 8, False, ["cuda:4,5", "cuda:6,7"]),  # 4 + 2 engines of 2 GPUs
        ("auto", 1, 1, 1, 2, False, ["cuda:1"]),
        ("auto", 1, 1, 8, 8, True, ["cuda:0"]),  # shared: beside trainer rank 0
        ("cpu", 1, 1, 8, 8, False, ["cpu"]),
        ("cuda:6", 1, 1, 6, 8, False, ["cuda:6"]),
        ("cuda:6", 1, 2, 6, 8, False, ["cuda:6,7"]),  # the first GPU of the engine's two
        ("cuda:0", 1, 1, 8, 8, True, ["cuda:0"]),
        (["cuda:7", "cuda:6"], 2, 1, 6, 8, False, ["cuda:7", "cuda:6"]),  # an explicit list, in its order
        (["cuda:4,6", "cuda:5,7"], 2, 2, 4, 8, False, ["cuda:4,6", "cuda:5,7"]),
    ],
)
def test_decision_table(requested, engines, tp, trainer_devices, visible_gpus, allow_shared, expected):
    assert engine_devices(requested, num_engines=engines, tensor_parallel_size=tp, trainer_devices=trainer_devices,
                          visible_gpus=visible_gpus, allow_shared=allow_shared) == expected


@pytest.mark.parametrize(
    ("requested", "engines", "tp", "trainer_devices", "visible_gpus", "message"),
    [
        ("auto", 1, 1, 8, 8, r"'auto' needs 1 GPU\(s\) the trainer does not use .* `trainer.devices`=8 leaves 0 of the 8 "
                             r"visible GPUs; set `trainer.devices`=7, .* `rollout.allow_shared_device`=true"),
        ("auto", 2, 2, 6, 8, r"needs 4 GPU\(s\) .* \(`rollout.num_engines`=2 x `rollout.tensor_parallel_size`=2\), "
                             r"but `trainer.devices`=6 leaves 2 .* set `trainer.devices`=4"),
        ("cuda:3", 1, 1, 7, 8, r"`rollout.device`='cuda:3' is one of the trainer's GPUs \(`trainer.devices`=7 uses cuda:0..cuda:6\)"),
        ("cuda:8", 1, 1, 7, 8, r"`rollout.device`='cuda:8' but 8 GPU\(s\) are visible; pick cuda:0..cuda:7"),
        ("cuda:7", 1, 2, 6, 8, r"`rollout.device`='cuda:7' but 8 GPU\(s\) are visible"),  # 7 and 8
        ("cuda:0", 1, 1, 1, 0, r"`rollout.device`='cuda:0' but 0 GPU\(s\) are visible; use 'cpu' or 'auto'"),
        ("gpu", 1, 1, 1, 8, r"`rollout.device`='gpu' must be 'auto', 'cpu' or 'cuda:N'"),
        ("cuda:6", 2, 1, 6, 8, r"`rollout.device`='cuda:6' names one device for `rollout.num_engines`=2 engines; .* "
                               r"\['cuda:6', 'cuda:7'\]"),
        (["cuda:6"], 2, 1, 6, 8, r"`rollout.device` lists 1 device\(s\) for `rollout.num_engines`=2; give one per engine"),
        (["cuda:6", "cuda:6"], 2, 1, 6, 8, r"places two engines on one GPU"),
        (["cuda:4,5,6"], 1, 2, 4, 8, r"'cuda:4,5,6' lists 3 GPUs for an engine of `rollout.tensor_parallel_size`=2"),
        ("cpu", 1, 2, 0, 0, r"`rollout.tensor_parallel_size`=2 splits an engine over GPUs; a CPU engine runs in one process"),
    ],
)
def test_errors_name_the_setting_the_values_and_the_fix(requested, engines, tp, trainer_devices, visible_gpus, message):
    with pytest.raises(ValueError, match=message):
        engine_devices(requested, num_engines=engines, tensor_parallel_size=tp, trainer_devices=trainer_devices,
                       visible_gpus=visible_gpus)


TRAINER_ENV = {
    "RANK": "0",
    "LOCAL_RANK": "0",
    "WORLD_SIZE": "7",
    "LOCAL_WORLD_SIZE": "7",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
    "NODE_RANK": "0",
    "TORCHELASTIC_RUN_ID": "abc",
    "PL_GLOBAL_SEED": "0",
    "PATH": "/usr/bin",
    "HF_HOME": "/data/hf",
}


def test_engine_environment_strips_the_process_group_and_pins_its_gpus():
    env = engine_environment("cuda:7", TRAINER_ENV)
    assert env == {"PATH": "/usr/bin", "HF_HOME": "/data/hf", "CUDA_VISIBLE_DEVICES": "7"}
    assert "RANK" in TRAINER_ENV  # the parent's mapping is not modified
    assert engine_environment("cuda:6,7", TRAINER_ENV)["CUDA_VISIBLE_DEVICES"] == "6,7"


def test_engine_environment_maps_through_the_parents_visible_devices():
    env = engine_environment("cuda:2", {**TRAINER_ENV, "CUDA_VISIBLE_DEVICES": "2,3,5"})
    assert env["CUDA_VISIBLE_DEVICES"] == "5"
    assert engine_environment("cuda:0,2", {"CUDA_VISIBLE_DEVICES": "2,3,5"})["CUDA_VISIBLE_DEVICES"] == "2,5"
    with pytest.raises(
        ValueError, match=r"'cuda:3' is outside the parent's CUDA_VISIBLE_DEVICES='2,3,5'"
    ):
        engine_environment("cuda:3", {"CUDA_VISIBLE_DEVICES": "2,3,5"})


def test_cpu_engine_sees_no_gpu():
    assert engine_environment("cpu", TRAINER_ENV)["CUDA_VISIBLE_DEVICES"] == ""


@pytest.mark.parametrize(("requested", "visible_gpus", "expected"), [
    ("auto", 0, True), ("auto", 8, False), ("cpu", 8, True), ("cuda:7", 8, False),
    (["cpu", "cpu"], 8, True), (["cpu", "cuda:7"], 8, False),
])
def test_engines_on_cpu_agrees_with_engine_devices(requested, visible_gpus, expected):
    """The trainer divides the CPU cores with its engines exactly when engine_devices puts them all
    on the CPU."""
    assert engines_on_cpu(requested, visible_gpus) == expected
    engines = 1 if isinstance(requested, str) else len(requested)
    devices = engine_devices(requested, num_engines=engines, trainer_devices=7 if visible_gpus else 0,
                             visible_gpus=visible_gpus)
    assert all(device == "cpu" for device in devices) == expected
