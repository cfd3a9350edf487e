"""Which failures are a lost peer (one line naming it) and which are not (their traceback stays)."""

from __future__ import annotations

import torch.distributed as dist

from ssl_pretrain.engine.distributed import DistInfo, lost_peer

RANK0_OF_2 = DistInfo(0, 2, 0, None, "gloo", False)  # type: ignore[arg-type]
PEERS = ["node-a pid 11", "node-b pid 22"]


def test_a_reset_connection_names_the_rank_its_host_and_the_address() -> None:
    exc = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                       "[127.0.0.1]:29061: Connection reset by peer. This is typically caused by a remote worker")
    assert lost_peer(exc, RANK0_OF_2, PEERS) == "rank 1 (node-b pid 22): Connection reset by peer at 127.0.0.1:29061"


def test_a_timeout_names_the_silent_rank_or_the_candidates() -> None:
    exc = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out "
                       "waiting 15000ms for send operation to complete")
    want = "rank 1 (node-b pid 22): Timed out waiting 15000ms for send operation to complete"
    assert lost_peer(exc, RANK0_OF_2, PEERS) == want
    four = DistInfo(2, 4, 0, None, "gloo", False)  # type: ignore[arg-type]
    assert lost_peer(exc, four, PEERS * 2).startswith("one of ranks 0, 1, 3: Timed out")
    assert lost_peer(dist.DistBackendError("NCCL watchdog timeout"), RANK0_OF_2, PEERS).startswith("rank 1 (node-b")


def test_other_failures_are_not_a_lost_peer() -> None:
    for exc in (RuntimeError("DataLoader timed out after 30 seconds"), RuntimeError("CUDA out of memory"),
                RuntimeError("Connection reset by peer while downloading a shard")):
        assert lost_peer(exc, RANK0_OF_2, PEERS) is None
