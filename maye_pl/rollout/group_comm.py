"""Object collectives of one trainer rank within its engine group (``groups.EngineGroups``).

Prompts go from a group's ranks to its owner (``gather_to_owner``) and rollouts back
(``scatter_from_owner``); ``all_gather`` and ``gather_to_zero`` span every rank. Without a process
group (one process) each collective is that one rank's identity, so the pipeline's code is the
same for 1 and N ranks.

One group (one engine on one node) uses the default process group, as before engine groups
existed; with several, every rank creates one subgroup per engine group, in the same order
(``torch.distributed.new_group`` is collective), plus the owners' group that relays weights.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from maye_pl.rollout.groups import EngineGroups
from maye_pl.strategies.weight_sync import Relay


class GroupComm:
    """This rank's view of the engine groups, and the collectives the rollout pipeline needs."""

    def __init__(self, groups: EngineGroups) -> None:
        self.groups = groups
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.distributed else 0
        world = dist.get_world_size() if self.distributed else 1
        if world != groups.world_size:
            raise ValueError(
                f"the engine groups are laid out for {groups.world_size} ranks, but {world} trainer process(es) run."
            )
        self.group = groups.group_of(self.rank)
        self.ranks = groups.groups[self.group]
        """The global ranks of this rank's group, its owner first."""
        self.owner = self.ranks[0]
        self.is_owner = self.rank == self.owner
        self._process_group = None  # None: the default group (all ranks are one group)
        self.relay: Relay | None = None
        """Global rank 0 broadcasts the gathered weights to every other engine owner (None: one engine)."""
        if self.distributed and len(groups.groups) > 1:
            for ranks in groups.groups:
                process_group = dist.new_group(list(ranks))
                if self.rank in ranks:
                    self._process_group = process_group
            self.relay = Relay(dist.new_group(list(groups.owners)), groups.owners)

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered

    def gather_to_owner(self, obj: Any) -> list[Any] | None:
        """The group's ``obj``s in rank order on its owner; None on the other ranks."""
        if len(self.ranks) == 1:
            return [obj]
        gathered: list[Any] | None = [None] * len(self.ranks) if self.is_owner else None
        dist.gather_object(obj, gathered, dst=self.owner, group=self._process_group)
        return gathered

    def scatter_from_owner(self, parts: list[Any] | None) -> Any:
        """The owner's ``parts[i]`` on the group's i-th rank (``parts`` is read on the owner only)."""
        if len(self.ranks) == 1:
            return parts[0]
        received: list[Any] = [None]
        dist.scatter_object_list(received, parts if self.is_owner else None, src=self.owner, group=self._process_group)
        return received[0]

    def gather_to_zero(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` in rank order on global rank 0; None elsewhere."""
        if not self.distributed:
            return [obj]
        gathered: list[Any] | None = [None] * dist.get_world_size() if self.rank == 0 else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered
