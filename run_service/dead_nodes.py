"""Which supervisor nodes are dead, as a recovery pass sees them
(:mod:`run_service.recovery`).

A pass looks at the nodes other than this one that still have ``running`` runs (this
node's own runs are supervised in memory):

- a node on *this host* is dead when its row is stopped or its process is provably
  gone: another boot id, or its recorded (pid, process start) is no longer alive. So a
  node restarted after a crash (SIGKILL, OOM) takes its previous incarnation's runs at
  once, without waiting for the dead one's lease to run out, and a second live
  run-service process on the same host is never mistaken for dead (even if stalled
  past its lease);
- a node on *another host* is dead when its row is stopped or its lease expired
  (``lease_expires_at < now()``).

A dead node on *another* host whose host still has a live node is left to that node (it
can check the processes locally). With no live node left on its host, its runs cannot be
checked from here: they are ``process_lost`` (the host is presumed gone; documented
limitation: if that host comes back with its agent processes alive, those processes are
not found by anyone, because their runs are already terminal).
"""

from __future__ import annotations

from dataclasses import dataclass

from common.db import Database
from common.outage import OUTAGE
from common.sql import Row
from run_service import node_store
from supervision.process_tree import boot_id, process_alive

#: After a database outage, how long nodes of other hosts are not taken for dead on an
#: expired lease alone: a lease and a renewal interval (``node_store.LEASE_SECONDS``
#: 15 s, ``node_leases.RENEW_SECONDS`` 5 s).
OUTAGE_GRACE_SECONDS = 20.0


@dataclass(frozen=True)
class DeadNode:
    """A node whose runs a pass may take over; ``local``: it ran on this host."""

    id: str
    host: str
    local: bool


async def dead_nodes(db: Database, me: str, hostname: str) -> dict[str, DeadNode]:
    """The nodes other than ``me`` with running runs that a pass of the node ``me`` on
    ``hostname`` may take over, by id."""
    async with db.unit_of_work() as tx:
        nodes = await node_store.dead_node_candidates(tx, me)
        live_hosts = await node_store.live_hosts(tx)
    my_boot = boot_id()
    dead: dict[str, DeadNode] = {}
    for n in nodes:
        local = n["host"] == hostname
        if not _gone(n, local, my_boot):
            continue
        if not local and n["host"] in live_hosts:
            continue  # a live node on that host checks its processes locally
        dead[str(n["id"])] = DeadNode(str(n["id"]), n["host"], local)
    return dead


def _gone(node: Row, local: bool, my_boot: str) -> bool:
    """Whether the node is dead (see the module docstring)."""
    if local:  # checked for sure; a stalled but live node keeps its runs
        return (
            bool(node["stopped"])
            or node["boot_id"] != my_boot
            or not process_alive(int(node["pid"]), node["process_started_at"].timestamp())
        )
    # Right after a database outage every lease may have run out: nodes get a lease's
    # time to renew before another host's are taken for dead.
    return bool(node["expired"]) and not OUTAGE.ended_within(OUTAGE_GRACE_SECONDS)
