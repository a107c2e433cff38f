"""Torch's CPU threads sized to the CPUs this process may use, not to the machine's cores.

torch starts one intra-op thread per core it sees: 64 in a container limited to 4 CPUs on a 64-core
node, where the threads then take turns on 4 and small ops (the head's epochs on precomputed
activations) run ten to fifty times slower. So the count comes from the affinity mask and the
cgroup's CPU quota (serving.bundle.cpus), shared among the processes torchrun starts on this machine, and
OMP_NUM_THREADS, when set (deploy/ sets it from the container's CPU limit), wins.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import torch

from serving.bundle.cpus import cgroup_quota, usable_cpus


def thread_count(env: Mapping[str, str], cpus: int, local_processes: int = 1) -> tuple[int, str]:
    """Intra-op threads for one process given the CPUs it may use and the processes torchrun started
    on this machine, and where the number came from (for the log)."""
    given = env.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given), "OMP_NUM_THREADS"
    share = max(1, cpus // max(1, local_processes))
    return share, f"{cpus} usable CPU(s)" + (f" shared by {local_processes} processes" if local_processes > 1 else "")


def configure(log: Callable[[str], None] | None = None, env: Mapping[str, str] = os.environ) -> int:
    """Set torch's intra-op threads for this process, and say so to `log`; returns the count."""
    local = int(env.get("LOCAL_WORLD_SIZE", "1") or 1)
    n, source = thread_count(env, usable_cpus(), local)
    torch.set_num_threads(n)
    if log is not None:
        quota = cgroup_quota()
        limit = f", cgroup quota {quota:g} CPUs" if quota is not None else ", no cgroup quota"
        log(f"threads: {n} for torch (from {source}: the affinity mask{limit})")
    return n
