"""Cheap dask tokens for merlin graph nodes.

Every ``map_partitions`` of merlin's executor (each fit phase, each transform) makes dask tokenize its
arguments, the graph's nodes. Dask has no token for a ``merlin.dag.Node``, so it pickles the node and
everything upstream of it (the side tables inside ``JoinExternal``, fitted statistics) two or three
times to check that the pickle is deterministic: 15-20 % of the ETL's time on 2M ratings with ML-25M's
side tables. The token only names the tasks of one graph; a fresh random one per call is always
correct (no two different graphs can share task keys), it only gives up dask's reuse of identical
graphs, which merlin's executor never builds twice.
"""

from __future__ import annotations

import uuid

from dask.base import normalize_token
from merlin.dag import Node

_registered = False


def register_node_tokens() -> None:
    """Give ``merlin.dag.Node`` a random dask token instead of a pickle (idempotent)."""
    global _registered
    if not _registered:
        normalize_token.register(Node)(_node_token)
        _registered = True


def _node_token(node: Node) -> tuple[str, str]:
    return "merlin-node", uuid.uuid4().hex
