"""How many CPUs this process may use: its affinity mask, capped by its cgroup's CPU quota.

os.cpu_count() is the node's: 64 in a container limited to 4 CPUs, which oversubscribes every pool
sized from it. Kubernetes' CPU limits are CFS quotas (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

_CGROUP = Path("/sys/fs/cgroup")


def usable_cpus() -> int:
    """CPUs this process may run on at once, at least 1."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        available = os.cpu_count() or 1
    quota = cgroup_quota()
    return max(1, min(available, math.ceil(quota)) if quota is not None else available)


def cgroup_quota(root: Path = _CGROUP) -> float | None:
    """The cgroup's CPU quota in CPUs (1.5 = one and a half), or None when it sets none."""
    try:  # cgroup v2: "max 100000" or "150000 100000"
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None
