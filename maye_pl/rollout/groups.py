"""Which trainer ranks each engine serves: K contiguous rank groups per node.

A node's ranks split into ``engines_per_node`` groups of contiguous ranks (as equal as possible,
the first groups one rank larger when they do not divide); each group's first rank owns the
group's engine, gathers only its group's prompts and scatters the responses back. Groups never
span nodes, so no prompt or image crosses nodes. Example, 2 nodes x 6 ranks, 2 engines per node::

    node 0: ranks 0 1 2 -> engine 0 (owner 0)    ranks 3 4 5 -> engine 1 (owner 3)
    node 1: ranks 6 7 8 -> engine 2 (owner 6)    ranks 9 10 11 -> engine 3 (owner 9)

One engine on one node (the default) is one group of every rank, owned by global rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from maye_pl.errors import ConfigError


@dataclass(frozen=True)
class EngineGroups:
    """The engine groups of a run.

    Args:
        world_size: trainer ranks in all (``trainer.num_nodes`` x ranks per node).
        num_nodes: nodes (``trainer.num_nodes``); ranks are node-major (node n holds ranks
            ``n * world_size / num_nodes`` onwards, as Lightning numbers them).
        engines_per_node: K (``rollout.num_engines``).
    """

    world_size: int
    num_nodes: int = 1
    engines_per_node: int = 1

    def __post_init__(self) -> None:
        problems = []
        if self.num_nodes < 1 or self.world_size % self.num_nodes:
            problems.append(f"{self.world_size} ranks do not split evenly over `trainer.num_nodes`={self.num_nodes}")
        elif self.engines_per_node < 1:
            problems.append(f"`rollout.num_engines`={self.engines_per_node} must be at least 1")
        elif self.engines_per_node > self.ranks_per_node:
            problems.append(
                f"`rollout.num_engines`={self.engines_per_node} needs a trainer rank per engine on each node to "
                f"own it, but each node runs {self.ranks_per_node} (`trainer.devices`); lower "
                f"`rollout.num_engines` to at most {self.ranks_per_node} or raise `trainer.devices`"
            )
        if problems:
            raise ConfigError("; ".join(problems) + ".")

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.num_nodes

    @property
    def num_engines(self) -> int:
        """Engines in all nodes."""
        return self.num_nodes * self.engines_per_node

    @cached_property
    def groups(self) -> tuple[tuple[int, ...], ...]:
        """Every group's global ranks, node-major (group g is engine g)."""
        size, extra = divmod(self.ranks_per_node, self.engines_per_node)
        groups = []
        for node in range(self.num_nodes):
            start = node * self.ranks_per_node
            for index in range(self.engines_per_node):
                length = size + (index < extra)
                groups.append(tuple(range(start, start + length)))
                start += length
        return tuple(groups)

    @property
    def owners(self) -> tuple[int, ...]:
        """The first rank of each group: the rank that owns the group's engine."""
        return tuple(ranks[0] for ranks in self.groups)

    def group_of(self, rank: int) -> int:
        """The group (= engine) index of global ``rank``."""
        return next(index for index, ranks in enumerate(self.groups) if rank in ranks)

    def node_of(self, group: int) -> int:
        return group // self.engines_per_node

    def local_index(self, group: int) -> int:
        """The engine's index among its node's engines (0 .. K-1): which of the node's engine devices it takes."""
        return group % self.engines_per_node

    def name(self, group: int) -> str:
        """How messages name the engine of ``group``: ``"engine 1 of 2 (node 0, ranks 3-5)"``."""
        ranks = self.groups[group]
        span = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
        return f"engine {group} of {self.num_engines} (node {self.node_of(group)}, {span})"
