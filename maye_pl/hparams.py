"""ReinforcePP's hyperparameter groups: small typed dataclasses, one YAML node each.

    model.advantages   AdvantageArgs   Step III.5: scores -> per-token advantages
    model.loss         LossArgs        Step IV: the policy loss, its clipping, the KL loss, aggregation
    model.ppo          PPOArgs         Step IV: epochs, minibatches, gradient accumulation
    model.off_policy   OffPolicyArgs   Step IV: importance weights of rollouts the engine sampled
    model.dynamic_sampling DynamicSamplingArgs  Step II: DAPO's dynamic sampling of groups
    model.lora         LoraArgs        (maye_pl/models/lora.py, shared with the SFT baseline)
    model.optim        OptimArgs       (maye_pl/optim.py, shared with the SFT baseline)

Each group checks itself (``problems``: every problem names its full key, the value, the rule and
the fix); ``cross_group_problems`` checks what spans groups; the module collects all of them and
raises once. jsonargparse reads the docstring under each field: ``--help`` and
``--print_config=comments`` show them.
"""

from __future__ import annotations

from dataclasses import dataclass

from maye_pl import rl
from maye_pl.types import SamplingConfig

GROUP_ESTIMATORS = ("reinforce_pp_baseline", "grpo", "dr_grpo")
"""Advantage estimators that compare the samples of one prompt (they need ``sampling.n`` >= 2)."""


def _unknown(key: str, value: str, choices: tuple[str, ...]) -> list[str]:
    return [] if value in choices else [f"`{key}`={value!r} is unknown; choose one of {sorted(choices)}."]


def _kl_coef(key: str, value: float) -> list[str]:
    return [] if value >= 0 else [f"`{key}`={value} must be >= 0 (a KL penalty); use 0 for none."]


@dataclass(frozen=True)
class AdvantageArgs:
    """How sequence scores become per-token advantages (``maye_pl.rl.estimate_advantages``)."""

    estimator: str = "reinforce_pp"
    """One of ``maye_pl.rl.ADVANTAGE_ESTIMATORS``: "reinforce_pp" (the paper: discounted returns
    whitened over the batch), "reinforce_pp_baseline" (each prompt's mean score subtracted first),
    "grpo" (each prompt's mean and std) or "dr_grpo" (each prompt's mean, no std)."""
    gamma: float = 1.0
    """Discount of the per-token returns (the paper: 1)."""
    kl_coef: float = 0.0
    """β_rew: the k3 KL to the reference folded into the token rewards (the paper: 0)."""
    maye_compat: bool = False
    """Whiten per rank and add the mean back, exactly as MAYE's code; False whitens over the
    global batch to zero mean."""

    def problems(self, key: str = "model.advantages") -> list[str]:
        """Every problem of these settings, each naming ``<key>.<field>``."""
        problems = _unknown(f"{key}.estimator", self.estimator, rl.ADVANTAGE_ESTIMATORS)
        if not 0.0 <= self.gamma <= 1.0:
            problems.append(f"`{key}.gamma`={self.gamma} must lie in [0, 1] (a discount factor).")
        return problems + _kl_coef(f"{key}.kl_coef", self.kl_coef)


@dataclass(frozen=True)
class LossArgs:
    """The loss of Step IV: a policy loss plus β_loss times the k3 KL to the reference."""

    policy_loss: str = "ppo_clip"
    """One of ``maye_pl.rl.POLICY_LOSSES``: "ppo_clip" (the paper), "gspo" (the sequence-level
    ratio, GSPO-token) or "cispo" (the clipped ratio as a stop-gradient coefficient)."""
    clip_low: float = 0.2
    """ε_low: the ratio π/π_old is clipped from below at 1 - clip_low (1 = no floor)."""
    clip_high: float = 0.2
    """ε_high: the ratio is clipped from above at 1 + clip_high (> clip_low: DAPO's clip-higher)."""
    kl_coef: float = 0.001
    """β_loss: the k3 KL(π‖π_ref) term of the loss (the paper: 0.001); 0 builds no reference."""
    agg: str = "token_mean"
    """One of ``maye_pl.rl.LOSS_AGGREGATIONS``: "token_mean" over the minibatch's valid tokens
    (DAPO), "seq_mean_token_mean" (each response's token mean, then their mean: GRPO, GSPO) or
    "seq_mean_token_sum_norm" (each response's token sum / ``sampling.max_tokens``: Dr.GRPO)."""

    def problems(self, key: str = "model.loss") -> list[str]:
        """Every problem of these settings, each naming ``<key>.<field>``."""
        problems = _unknown(f"{key}.policy_loss", self.policy_loss, tuple(rl.POLICY_LOSSES))
        problems += _unknown(f"{key}.agg", self.agg, rl.LOSS_AGGREGATIONS)
        if not 0 <= self.clip_low <= 1:
            problems.append(f"`{key}.clip_low`={self.clip_low} must lie in [0, 1] (the ratio floor is 1 - it).")
        if self.clip_high < 0:
            problems.append(f"`{key}.clip_high`={self.clip_high} must be >= 0 (the ratio ceiling is 1 + it).")
        return problems + _kl_coef(f"{key}.kl_coef", self.kl_coef)


@dataclass(frozen=True)
class PPOArgs:
    """The update schedule of one rollout batch: epochs × minibatches × micro-batches."""

    epochs: int = 1
    """Passes over each rollout batch."""
    batch_size: int = 4
    """Rows (responses) per minibatch on each rank; each minibatch is one optimizer step. It must
    divide the rows per rank, ``data.batch_size`` × ``model.sampling.n``."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per minibatch (a memory knob: the loss is the same for any value)."""

    def problems(self, key: str = "model.ppo") -> list[str]:
        """Every problem of these settings, each naming ``<key>.<field>``."""
        problems = [
            f"`{key}.{name}`={getattr(self, name)} must be at least 1."
            for name in ("epochs", "batch_size", "gradient_accumulation_steps")
            if getattr(self, name) < 1
        ]
        if min(self.batch_size, self.gradient_accumulation_steps) >= 1 and self.batch_size % self.gradient_accumulation_steps:
            problems.append(
                f"`{key}.gradient_accumulation_steps`={self.gradient_accumulation_steps} must divide "
                f"`{key}.batch_size`={self.batch_size}; pick a divisor."
            )
        return problems


@dataclass(frozen=True)
class OffPolicyArgs:
    """Importance weights π_old/π_behaviour of the sampled tokens, from the engine's log-probs
    (decoupled PPO; ``maye_pl.rl.off_policy``)."""

    correction: bool | None = None
    """Weight each token's policy loss by the bounded ratio π_old/π_behaviour. None: on for
    rollouts sampled by an older policy (``rollout.max_staleness`` 1), off otherwise (MAYE); True
    also corrects the engine/trainer numerics mismatch of on-policy rollouts (bf16 on GPUs)."""
    mode: str = "truncate"
    """"truncate": weight min(ratio, ``high``) (truncated IS); "mask": weight the ratio inside
    [``low``, ``high``] and 0 outside (masked IS: the token or response is dropped)."""
    level: str = "token"
    """"token": one ratio per token; "sequence": the response's ratio (the product over its
    tokens) for each of its tokens."""
    low: float = 0.0
    """The smallest ratio "mask" keeps (truncation has no floor)."""
    high: float = 2.0
    """C: the largest weight ("truncate") or the largest ratio kept ("mask")."""

    def problems(self, key: str = "model.off_policy") -> list[str]:
        """Every problem of these settings, each naming ``<key>.<field>``."""
        problems = _unknown(f"{key}.mode", self.mode, rl.OFF_POLICY_MODES)
        problems += _unknown(f"{key}.level", self.level, rl.OFF_POLICY_LEVELS)
        if self.high <= 0:
            problems.append(f"`{key}.high`={self.high} must be > 0 (the largest importance weight).")
        if not 0 <= self.low <= max(self.high, 0):
            problems.append(f"`{key}.low`={self.low} must lie in [0, `{key}.high`={self.high}].")
        return problems


@dataclass(frozen=True)
class DynamicSamplingArgs:
    """DAPO's dynamic sampling (arXiv 2503.14476 §3.2; ``maye_pl.rollout.dynamic_sampling``): groups
    whose scores are all equal are dropped and more prompts are generated until the batch is full."""

    enabled: bool = False
    """Drop a prompt's G samples when their scores (after penalties) are all equal: under a group
    estimator (grpo, dr_grpo) their advantage is 0. Extra prompts come from a per-(seed, step,
    round) draw of the training split, so the epoch's order and an exact resume are kept."""
    max_extra_rounds: int = 3
    """Generation rounds after the step's batch, at most; when they run out, each rank fills its
    batch with dropped groups (advantage 0), so every rank keeps ``data.batch_size`` prompts."""

    def problems(self, key: str = "model.dynamic_sampling") -> list[str]:
        """Every problem of these settings, each naming ``<key>.<field>``."""
        if self.max_extra_rounds < 0:
            return [f"`{key}.max_extra_rounds`={self.max_extra_rounds} must be >= 0 (0: drop nothing, refill nothing)."]
        return []


def cross_group_problems(advantages: AdvantageArgs, off_policy: OffPolicyArgs, sampling: SamplingConfig,
                         dynamic_sampling: DynamicSamplingArgs = DynamicSamplingArgs()) -> list[str]:
    """Problems that span groups of ReinforcePP's hyperparameters."""
    problems = []
    if dynamic_sampling.enabled and sampling.n < 2:
        problems.append(
            f"`model.dynamic_sampling.enabled` drops groups whose G samples score alike, but "
            f"`model.sampling.n`={sampling.n} makes every group one sample; set it to 2 or more."
        )
    if advantages.estimator in GROUP_ESTIMATORS and sampling.n < 2:
        problems.append(
            f"`model.advantages.estimator`={advantages.estimator!r} compares samples of the same "
            f"prompt, but `model.sampling.n`={sampling.n}; set it to 2 or more."
        )
    if off_policy.correction and not sampling.logprobs:
        problems.append(
            "`model.off_policy.correction` needs the engine's log-probs; set `model.sampling.logprobs` true."
        )
    return problems
