#!/usr/bin/env bash
# Reinforce++ on one 8-GPU node, the paper's layout: 7 GPUs train (FSDP2), GPU 7 runs vLLM.
#
#   DATA=geo3k MODEL=2.5it bash scripts/train_ppo_vllm_distributed.sh [extra CLI flags]
#
#   DATA   geo3k | mmmath                    (configs/geo3k.yaml, configs/mmmath.yaml)
#   MODEL  2.5it (Qwen2.5-VL-7B-Instruct) | 2it (Qwen2-VL-7B-Instruct) | 3it (Qwen3-VL-8B-Instruct)
#   MODEL_DIR  where the HF checkpoints live (default: ./models)
#
# Lightning launches the 7 training processes itself (trainer.devices: 7); the RolloutCallback on
# rank 0 starts vLLM in its own process with CUDA_VISIBLE_DEVICES set to the first GPU the trainer
# does not use. Extra flags override the YAML, e.g. `--trainer.max_epochs 3 --model.lr 1e-6`.
# More engines per node: `--trainer.devices 6 --rollout.num_engines 2` (6+2: ranks 0-2 generate on
# GPU 6, ranks 3-5 on GPU 7), `--trainer.devices 4 --rollout.num_engines 4` (4+4); README: layouts.
#
# Multi-node: run the same command on every node with `--trainer.num_nodes N` and the usual
# torch.distributed variables (MASTER_ADDR, MASTER_PORT, NODE_RANK) set, or under SLURM with
# `srun` (Lightning reads SLURM's variables). Every node runs its own engines on its spare GPUs and
# its ranks' prompts stay on the node; keep `trainer.devices` at 7 on 8-GPU nodes (7+1 each).
#
# Preemption (SLURM, Kubernetes, spot instances): on SIGTERM or SIGUSR1 every rank finishes the
# current step, checkpoints it, shuts the engine down and exits 143; `--ckpt_path last` resumes from
# the newest complete checkpoint of the run (a fresh start when there is none), so a requeued job
# can always pass it. A SLURM job (srun starts the 7 ranks; Lightning's SLURM auto-requeue turns
# SIGUSR1 into hpc_ckpt_N.ckpt + `scontrol requeue`, at the step boundary):
#
#   #!/bin/bash
#   #SBATCH --nodes=1 --gres=gpu:8 --ntasks-per-node=7 --cpus-per-task=12
#   #SBATCH --signal=USR1@600   # warn 10 min before the time limit: one step + the save must fit
#   #SBATCH --requeue           # a job preempted with SIGTERM is requeued by SLURM itself
#   srun bash scripts/train_ppo_vllm_distributed.sh --ckpt_path last
#
# For SIGTERM preemption give the partition a GraceTime of at least one step: SLURM sends SIGKILL
# after it.
set -euo pipefail

DATA=${DATA:-geo3k}
MODEL=${MODEL:-2.5it}
MODEL_DIR=${MODEL_DIR:-./models}

case "$DATA" in
  geo3k | mmmath) config="configs/${DATA}.yaml" ;;
  *) echo "DATA=$DATA: choose geo3k or mmmath" >&2; exit 2 ;;
esac
case "$MODEL" in
  2.5it) model_path="$MODEL_DIR/Qwen2.5-VL-7B-Instruct" ;;
  2it) model_path="$MODEL_DIR/Qwen2-VL-7B-Instruct" ;;
  3it) model_path="$MODEL_DIR/Qwen3-VL-8B-Instruct" ;;
  *) echo "MODEL=$MODEL: choose 2.5it, 2it or 3it" >&2; exit 2 ;;
esac
if [ ! -d "$model_path" ]; then
  echo "$model_path is missing: download the checkpoint there or set MODEL_DIR" >&2
  exit 2
fi

exec python -m maye_pl fit --config "$config" \
  --model.model_path "$model_path" \
  --trainer.logger.init_args.name "${DATA}_${MODEL}" \
  "$@"
