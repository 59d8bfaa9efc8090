"""Metric names shared by the trainer (writer) and `maye_pl report` (reader).

Definitions: the table in the maye_pl.evaluation package docstring.
"""

GENERATION_STEP = "generation_step"
"""Rollout batches generated so far (x axis of the per-step figures)."""

TRAIN_ACCURACY_EPOCH = "reward/accuracy_epoch"
"""Epoch mean of the training accuracy reward; Lightning's name for
self.log("reward/accuracy", ..., on_step=True, on_epoch=True) at epoch end."""

RESPONSE_LENGTH_MEAN = "rollout/response_length_mean"
"""Mean response length in tokens of a rollout batch."""

REFLECTION_PREFIX = "reflection/"
"""Prefix of the reflection metrics: reflection/<ratio key> and reflection/word_count/<word>."""
