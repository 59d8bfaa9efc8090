"""Engine placement: the device decision table and the environment the engine process gets."""

from __future__ import annotations

import pytest

from maye_pl.rollout.placement import choose_engine_device, engine_environment


@pytest.mark.parametrize(
    ("requested", "trainer_devices", "visible_gpus", "allow_shared", "expected"),
    [
        ("auto", 1, 0, False, "cpu"),  # CPU machine
        ("auto", 7, 8, False, "cuda:7"),  # MAYE's node: 7 trainer GPUs + the engine on the 8th
        ("auto", 1, 2, False, "cuda:1"),
        ("auto", 8, 8, True, "cuda:0"),  # shared: beside trainer rank 0
        ("cpu", 8, 8, False, "cpu"),
        ("cuda:6", 6, 8, False, "cuda:6"),
        ("cuda:0", 8, 8, True, "cuda:0"),
    ],
)
def test_decision_table(requested, trainer_devices, visible_gpus, allow_shared, expected):
    assert (
        choose_engine_device(
            requested,
            trainer_devices=trainer_devices,
            visible_gpus=visible_gpus,
            allow_shared=allow_shared,
        )
        == expected
    )


@pytest.mark.parametrize(
    ("requested", "trainer_devices", "visible_gpus", "message"),
    [
        (
            "auto",
            8,
            8,
            r"`trainer.devices`=8 uses all 8 visible GPUs; set `trainer.devices`=7 .* "
            r"`rollout.allow_shared_device`=true",
        ),
        (
            "cuda:3",
            7,
            8,
            r"`rollout.device`='cuda:3' is one of the trainer's GPUs "
            r"\(`trainer.devices`=7 uses cuda:0..cuda:6\)",
        ),
        ("cuda:8", 7, 8, r"`rollout.device`='cuda:8' but 8 GPU\(s\) are visible; pick cuda:0..cuda:7"),
        ("cuda:0", 1, 0, r"`rollout.device`='cuda:0' but 0 GPU\(s\) are visible; use 'cpu' or 'auto'"),
        ("gpu", 1, 8, r"`rollout.device`='gpu' must be 'auto', 'cpu' or 'cuda:N'"),
    ],
)
def test_errors_name_the_setting_the_values_and_the_fix(
    requested, trainer_devices, visible_gpus, message
):
    with pytest.raises(ValueError, match=message):
        choose_engine_device(requested, trainer_devices=trainer_devices, visible_gpus=visible_gpus)


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


def test_engine_environment_strips_the_process_group_and_pins_one_gpu():
    env = engine_environment("cuda:7", TRAINER_ENV)
    assert env == {"PATH": "/usr/bin", "HF_HOME": "/data/hf", "CUDA_VISIBLE_DEVICES": "7"}
    assert "RANK" in TRAINER_ENV  # the parent's mapping is not modified


def test_engine_environment_maps_through_the_parents_visible_devices():
    env = engine_environment("cuda:2", {**TRAINER_ENV, "CUDA_VISIBLE_DEVICES": "2,3,5"})
    assert env["CUDA_VISIBLE_DEVICES"] == "5"
    with pytest.raises(
        ValueError, match=r"'cuda:3' is outside the parent's CUDA_VISIBLE_DEVICES='2,3,5'"
    ):
        engine_environment("cuda:3", {"CUDA_VISIBLE_DEVICES": "2,3,5"})


def test_cpu_engine_sees_no_gpu():
    assert engine_environment("cpu", TRAINER_ENV)["CUDA_VISIBLE_DEVICES"] == ""
