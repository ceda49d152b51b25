"""Group layout for shared-prefix decode, computed once per decode step (no triton needed)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SharedPrefixPlan:
    """How sequences map to prefix groups; build once per decode step and reuse in every layer.

    Building it reads ``seq_group`` on the host once (one sync); the kernels
    then run without further syncs.
    """

    row_start: torch.Tensor
    row_count: torch.Tensor
    row_seq: torch.Tensor
    max_members: int


def plan_shared_prefix(seq_group: torch.Tensor, num_groups: int) -> SharedPrefixPlan:
    """Group members sorted by group, with each group's start and size;
    sequences of group -1 (no shared prefix) come last and belong to none."""
    groups = seq_group.long()
    member = groups >= 0
    counts = torch.bincount(groups[member], minlength=num_groups)
    if counts.numel() > num_groups:
        raise ValueError(f"seq_group has a group id >= the {num_groups} prefix groups")
    if bool((groups < -1).any()):
        raise ValueError("seq_group holds a group id below -1")
    starts = counts.cumsum(0) - counts
    order = torch.argsort(torch.where(member, groups, num_groups), stable=True)
    return SharedPrefixPlan(
        starts.to(torch.int32), counts.to(torch.int32), order.to(torch.int32), int(counts.max()) if num_groups else 0
    )
