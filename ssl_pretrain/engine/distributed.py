"""Process-group setup for one process, the DeepSpeed launcher, torchrun and several nodes.

The launchers (``deepspeed``, ``torchrun``) export ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``. A plain ``python launch/pretrain.py`` exports nothing: then a
single-rank group on 127.0.0.1 and a free port is created, so the code path is the same.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "PeerLost", "init_distributed", "lost_peer", "peer_names", "shutdown_distributed", "free_port",
           "cpu_threads"]

log = logging.getLogger(__name__)

# A single-rank group this process created itself (plain ``python``, or in-process calls such as
# the demo's). It is kept for the life of the process and reused by later runs: DeepSpeed caches a
# clone of the world group (``deepspeed.utils.groups``) that no public API resets, so a destroyed
# and re-created group would break the next ``deepspeed.initialize``.
_OWN_GROUP: DistInfo | None = None
_OWN_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
_OWN_ENV_VALUES: dict[str, str] = {}


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    owns_env: bool = False  # True when this process created the single-rank environment itself

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that logs, writes summaries and exports."""
        return self.rank == 0


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _skip_cpu_shm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory all-reduce op on CPU-only machines.

    ``deepspeed.comm.TorchBackend`` builds ``deepspeed_shm_comm`` (a C++ extension, about two
    minutes of compiling in a fresh environment) whenever ``__compatible_ops__`` says it can. The
    op only serves DeepSpeed's inference all-reduce; training gradients go through gloo. DeepSpeed
    keeps the probed dict in the module and documents that edits to it persist, so marking the op
    incompatible is enough.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def cpu_threads(requested: int | None) -> int:
    """Intra-op threads for one CPU rank: ``requested``, else OMP_NUM_THREADS, else cores / local ranks.

    Every rank would otherwise start one thread per core; oversubscribed threads spin and stall
    each other and gloo's collectives (tiny-model steps became 15-50× slower in our runs).
    """
    if requested is not None:
        return requested
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    return max(1, (os.cpu_count() or 1) // max(1, local))


class PeerLost(RuntimeError):
    """Another rank stopped answering (its node died, hung or lost the network); the message is one line."""


def peer_names(info: DistInfo) -> list[str]:
    """``host pid N`` of every rank, gathered once at the start, so that a rank can name a peer that is gone."""
    names: list[str | None] = [None] * info.world_size
    dist.all_gather_object(names, f"{socket.gethostname()} pid {os.getpid()}")
    return [str(n) for n in names]


def lost_peer(exc: BaseException, info: DistInfo, peers: list[str]) -> str | None:
    """Who is gone and why, when a collective failed because another rank stopped answering; else ``None``.

    gloo and NCCL give the peer's address when a connection breaks (``Read error [10.0.0.2]:29061:
    Connection reset by peer``) but not when a wait times out (a hung node); with two ranks the
    other one is the peer either way, with more the message lists the candidates.
    """
    text = " ".join(str(exc).split())
    if not isinstance(exc, dist.DistError) and not re.search(r"\b(gloo|nccl)\b", text, re.I):
        return None  # not a collective's failure (a DataLoader timeout, a bug): the traceback stays
    where = re.search(r"\[([\w.:-]+)\]:(\d+)", text)
    reason = re.search(r"(Connection reset by peer|Connection closed by peer|Timed out[^.]*|Broken pipe)", text)
    why = (reason.group(1) if reason else text[:120]) + (f" at {where.group(1)}:{where.group(2)}" if where else "")
    others = [r for r in range(info.world_size) if r != info.rank]
    who = (f"rank {others[0]} ({peers[others[0]]})" if len(others) == 1
           else f"one of ranks {', '.join(map(str, others))}")
    return f"{who}: {why}"


def init_distributed(timeout_s: float | None = None) -> DistInfo:
    """Join (or create) the process group: nccl on GPUs, gloo on CPUs.

    Args:
        timeout_s: How long a collective waits for the other ranks before it fails (``train.peer_timeout_s``);
            ``None``: torch's and DeepSpeed's defaults.

    Returns:
        This process's :class:`DistInfo`.
    """
    import deepspeed

    global _OWN_GROUP, _OWN_ENV_VALUES
    if _OWN_GROUP is not None and dist.is_initialized():
        os.environ.update(_OWN_ENV_VALUES)  # DeepSpeed reads LOCAL_RANK & co. in initialize()
        return _OWN_GROUP
    owns_env = "RANK" not in os.environ and "WORLD_SIZE" not in os.environ
    if owns_env:
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
        )
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    _skip_cpu_shm_build()
    timeout = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    if timeout_s:
        # groups made later by new_group (DeepSpeed's data-parallel group among them) take torch's module
        # default, not the world group's timeout; that default is the one setting that reaches them all
        import torch.distributed.distributed_c10d as c10d

        c10d.default_pg_timeout = timeout["timeout"]
    if not dist.is_initialized() and _local_rendezvous():
        # a job on this machine only: its rendezvous and gloo listen on loopback, not on every interface
        os.environ.setdefault("GLOO_SOCKET_IFNAME", _loopback_interface())
        store = _loopback_store(rank, world, int(os.environ["MASTER_PORT"]))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, **timeout)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False, **timeout)
    else:
        deepspeed.init_distributed(dist_backend=backend, dist_init_required=False, verbose=False, **timeout)
    info = DistInfo(rank, world, local_rank, device, backend, owns_env)
    if owns_env:
        _OWN_GROUP = info
        _OWN_ENV_VALUES = {key: os.environ[key] for key in _OWN_ENV}
    return info


_LISTENERS: list[socket.socket] = []  # rank 0's bound rendezvous sockets, open for the life of the process


def _local_rendezvous() -> bool:
    """Whether the job meets on this machine: ``MASTER_ADDR`` is a loopback address and no launcher
    (torchrun's agent, ``TORCHELASTIC_USE_AGENT_STORE``) already serves the store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        return False
    try:
        return ipaddress.ip_address(socket.gethostbyname(os.environ.get("MASTER_ADDR", ""))).is_loopback
    except (OSError, ValueError):
        return False


def _loopback_interface() -> str:
    """The loopback interface's name (``lo`` on Linux), for gloo's ``GLOO_SOCKET_IFNAME``."""
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in names if n == "lo" or n.startswith("lo")), "lo")


def _loopback_store(rank: int, world: int, port: int) -> dist.TCPStore:
    """The job's rendezvous store, its server listening on 127.0.0.1 only.

    torch's ``TCPStore`` server listens on every interface (``::``) even when ``MASTER_ADDR`` is
    127.0.0.1; rank 0 therefore binds the socket itself and hands it over (``master_listen_fd``),
    the other ranks connect as clients.
    """
    if rank != 0:
        return dist.TCPStore("127.0.0.1", port, world, False)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    _LISTENERS.append(sock)
    return dist.TCPStore("127.0.0.1", port, world, True, master_listen_fd=sock.fileno())


def shutdown_distributed(info: DistInfo | None) -> None:
    """Leave a launcher's process group at the end of the job (a self-made single-rank group is kept).

    The environment of a self-made group is removed between runs, so that child processes
    (tools, tests) do not inherit a rendezvous on this process's port.
    """
    if info is None:
        return
    if info.owns_env:
        for key in _OWN_ENV:
            os.environ.pop(key, None)
    elif dist.is_initialized():
        dist.destroy_process_group()
