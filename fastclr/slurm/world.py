"""The Slurm job as the SLURM_* environment describes it: node lists, GPUs per node, ranks, master port."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

# Master ports come from [20000, 32000): below Linux's default ephemeral range (32768–60999), where the kernel may
# already have handed the port to some outgoing connection on the first node.
MASTER_PORT_BASE = 20000
MASTER_PORT_SPAN = 12000


class SlurmError(ValueError):
    """The Slurm environment (or a request about it) is unusable; the message names the variable or argument."""


# --------------------------------------------------------------------------------------------------------------- #
# Node lists


def _split_outside_brackets(text: str, whole: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            if depth:
                raise SlurmError(f"node list '{whole}': nested '[' at position {i}")
            depth = 1
        elif ch == "]":
            if not depth:
                raise SlurmError(f"node list '{whole}': ']' at position {i} without a matching '['")
            depth = 0
        elif ch == "," and not depth:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise SlurmError(f"node list '{whole}': '[' is never closed")
    parts.append(text[start:])
    return parts


def _range_values(body: str, whole: str) -> list[str]:
    """'01-03,07' → ['01', '02', '03', '07']; a range is zero-padded to the width of its lower bound, as Slurm does."""
    values = []
    for part in body.split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise SlurmError(f"node list '{whole}': '[{body}]' holds '{part}'; expected N or N-M with digits")
        if not sep:
            values.append(lo)
            continue
        a, b = int(lo), int(hi)
        if a > b:
            raise SlurmError(f"node list '{whole}': range '{part}' runs backwards")
        values.extend(str(n).zfill(len(lo)) for n in range(a, b + 1))
    return values


def _expand_name(name: str, whole: str) -> list[str]:
    """Cartesian product of the bracket groups of one name: 'r[1-2]-n[1-2]' → r1-n1, r1-n2, r2-n1, r2-n2."""
    i = name.find("[")
    if i < 0:
        return [name]
    j = name.index("]", i)  # balanced: checked by _split_outside_brackets
    rest = _expand_name(name[j + 1:], whole)
    return [name[:i] + v + tail for v in _range_values(name[i + 1:j], whole) for tail in rest]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed host list ('node[01-03,07],gpu-a[1-2]') in Slurm's order.

    Pure Python on purpose: every node must derive the same list without running anything, and the tests need no
    Slurm. Covers what Slurm writes into SLURM_JOB_NODELIST: prefixes and suffixes, several bracket groups per name,
    comma lists and zero-padded ranges inside brackets, several names separated by commas outside brackets.
    """
    text = nodelist.strip()
    if not text:
        raise SlurmError("node list is empty")
    hosts = []
    for name in _split_outside_brackets(text, text):
        name = name.strip()
        if not name or name.startswith("["):
            raise SlurmError(f"node list '{text}': empty host name around '{name}'")
        hosts.extend(_expand_name(name, text))
    return hosts


# --------------------------------------------------------------------------------------------------------------- #
# The world as Slurm describes it


def default_master_port(job_id: int) -> int:
    """A port every node derives from the job id alone; a requeued job keeps its id and so its port."""
    return MASTER_PORT_BASE + job_id % MASTER_PORT_SPAN


def parse_gpu_count(value: str, name: str) -> int:
    """'4', 'gpu:4', 'a100:4', 'a100:2,v100:2' (Slurm's [type:]count, comma-separated per type) → GPUs per node."""
    total = 0
    for item in value.split(","):
        count = item.strip().rsplit(":", 1)[-1]
        if not count.isdigit():
            raise SlurmError(f"{name}={value!r}: expected [type:]count such as 4 or a100:4")
        total += int(count)
    return total


def _int_env(env: Mapping[str, str], name: str, required: bool, why: str = "") -> int | None:
    raw = env.get(name)
    if raw is None or raw == "":
        if required:
            raise SlurmError(f"{name} is not set{why}; run this inside a Slurm allocation (sbatch/salloc/srun)")
        return None
    try:
        return int(raw)
    except ValueError:
        raise SlurmError(f"{name}={raw!r} is not an integer") from None


def _gpus_from_env(env: Mapping[str, str]) -> int:
    if env.get("SLURM_GPUS_ON_NODE"):
        return _int_env(env, "SLURM_GPUS_ON_NODE", True)
    if env.get("SLURM_GPUS_PER_NODE"):
        return parse_gpu_count(env["SLURM_GPUS_PER_NODE"], "SLURM_GPUS_PER_NODE")
    if env.get("SLURM_JOB_GPUS"):  # device indices, e.g. '0,1,2,3' (jobs that asked with --gres=gpu:N)
        return len([g for g in env["SLURM_JOB_GPUS"].split(",") if g.strip()])
    raise SlurmError("GPUs per node unknown: none of SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE, SLURM_JOB_GPUS is set; "
                     "submit with --gpus-per-node=G or pass --gpus-per-node G (on CPU nodes: ranks per node)")


def _tasks_per_node(env: Mapping[str, str]) -> int | None:
    """Tasks the job has on each node: SLURM_NTASKS_PER_NODE when it asked for it, else the first count of
    SLURM_TASKS_PER_NODE ('8(x2)' = 8 tasks on each of 2 nodes)."""
    n = _int_env(env, "SLURM_NTASKS_PER_NODE", False)
    if n is not None:
        return n
    m = re.match(r"\s*(\d+)", env.get("SLURM_TASKS_PER_NODE", ""))
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class SlurmWorld:
    """Nodes × GPUs of one job; global ranks are laid out node by node (node i holds ranks i·G … i·G+G−1)."""

    job_id: int
    nodes: tuple[str, ...]
    gpus_per_node: int
    node_rank: int
    """This process's node (SLURM_NODEID): an index into ``nodes``."""
    master_port: int
    procid: int | None = None
    """SLURM_PROCID: the task's index in the step (the global rank in mode ``rank``)."""
    localid: int | None = None
    """SLURM_LOCALID: the task's index on its node."""
    ntasks: int | None = None
    """SLURM_NTASKS of the step (or job)."""
    cpus_per_task: int | None = None
    tasks_per_node: int | None = None
    """Tasks per node of the job: how many tasks its ``--cpus-per-task`` is counted for."""
    restart_count: int = 0
    master_host: str | None = None
    """Where rank 0 listens, when not the first node's name (a name that does not resolve: its NodeAddr)."""

    def __post_init__(self):
        if not self.nodes:
            raise SlurmError("the job has no nodes")
        if self.gpus_per_node < 1:
            raise SlurmError(f"GPUs per node is {self.gpus_per_node}; need >= 1 (on CPU nodes pass --gpus-per-node N "
                             "for N ranks per node)")
        if not 0 <= self.node_rank < len(self.nodes):
            raise SlurmError(f"SLURM_NODEID={self.node_rank} is outside the job's {len(self.nodes)} node(s)")
        if not 1 <= self.master_port <= 65535:
            raise SlurmError(f"master port {self.master_port} is not a TCP port")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, gpus_per_node: int | None = None,
                 master_port: int | None = None, master_addr: str | None = None) -> "SlurmWorld":
        """Read the job from SLURM_* variables; ``gpus_per_node``/``master_port``/``master_addr`` override what they
        imply."""
        env = os.environ if env is None else env
        job_id = _int_env(env, "SLURM_JOB_ID", True)
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise SlurmError("SLURM_JOB_NODELIST (or SLURM_NODELIST) is not set; run this inside a Slurm allocation")
        nodes = tuple(expand_nodelist(nodelist))
        for name in ("SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
            n = _int_env(env, name, False)
            if n is not None and n != len(nodes):
                raise SlurmError(f"{name}={n} but the node list '{nodelist}' names {len(nodes)} node(s)")
        if gpus_per_node is None:
            gpus_per_node = _gpus_from_env(env)
        return cls(job_id=job_id, nodes=nodes, gpus_per_node=gpus_per_node,
                   node_rank=_int_env(env, "SLURM_NODEID", True, " (the node's index in the job)"),
                   master_port=default_master_port(job_id) if master_port is None else master_port,
                   procid=_int_env(env, "SLURM_PROCID", False), localid=_int_env(env, "SLURM_LOCALID", False),
                   ntasks=_int_env(env, "SLURM_NTASKS", False),
                   cpus_per_task=_int_env(env, "SLURM_CPUS_PER_TASK", False),
                   tasks_per_node=_tasks_per_node(env),
                   restart_count=_int_env(env, "SLURM_RESTART_COUNT", False) or 0, master_host=master_addr)

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def master_addr(self) -> str:
        """The first node: it hosts global rank 0, whose TCP store every rank dials."""
        return self.master_host or self.nodes[0]

    @property
    def node(self) -> str:
        return self.nodes[self.node_rank]

    def ranks_on(self, node_rank: int) -> range:
        return range(node_rank * self.gpus_per_node, (node_rank + 1) * self.gpus_per_node)

    def cpus_per_rank(self, mode: str) -> int | None:
        """CPUs Slurm gave one rank: --cpus-per-task in mode rank; the node task's share in mode deepspeed."""
        if self.cpus_per_task is None:
            return None
        if mode == "rank":
            return self.cpus_per_task
        return max(1, self.cpus_per_task * (self.tasks_per_node or 1) // self.gpus_per_node)


def hostfile_text(world: SlurmWorld) -> str:
    """DeepSpeed hostfile (MPI style): one 'host slots=G' line per node, in node-rank order."""
    return "".join(f"{host} slots={world.gpus_per_node}\n" for host in world.nodes)

