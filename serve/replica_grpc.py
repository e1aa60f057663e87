"""Each Serve replica's gRPC server bound to this node's address, not to every interface.

Ray 2.60 starts a gRPC server in every replica, for handle calls between
deployments, and binds it to ``[::]:0`` (``_on_initialized`` in
ray/serve/_private/replica.py), with no setting to change it. Callers reach it at
the replica's node address (``ReplicaInfo.node_ip``, ray/serve/_private/
request_router/replica_wrapper.py), so binding that address instead loses no
caller: on a laptop the node address is 127.0.0.1 (``detserve serve`` starts
Ray with it) and the port stays on loopback; on a cluster it is the node's own
address, reachable from the other nodes as before.

:func:`bind_to_node_address` swaps the helper Ray's replica module calls
(``add_port_to_grpc_server``) for one that rewrites that one address. It runs
in the replica process, from the deployment's constructor, before Serve starts
the server. If Ray moves the call, the swap finds nothing to patch and says so
in the replica's log; the start banner then names the port that is left on
every interface (serve/run.py, :func:`~detserve.serve.run.exposure_line`), and
tests/test_security.py fails against the pinned Ray.
"""

from __future__ import annotations

import logging

log = logging.getLogger("ray.serve")

#: The address Ray 2.60 gives each replica's gRPC server.
WILDCARD = "[::]:0"


def bind_to_node_address() -> bool:
    """In a Serve replica: make Ray bind its gRPC server to the node's address. Returns whether the patch is in place."""
    import ray

    if not ray.is_initialized():  # outside Ray (in-process tests): there is no gRPC server to bind
        return False
    from ray.serve._private import replica

    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None:
        log.warning("detserve: ray.serve._private.replica.add_port_to_grpc_server is gone; the replica's gRPC port stays on %s", WILDCARD)
        return False
    if getattr(original, "detserve_binds", None):
        return True
    node_ip = ray.util.get_node_ip_address()
    host = f"[{node_ip}]" if ":" in node_ip else node_ip

    def add_port_to_grpc_server(server, address):
        return original(server, f"{host}:0" if address == WILDCARD else address)

    add_port_to_grpc_server.detserve_binds = host
    replica.add_port_to_grpc_server = add_port_to_grpc_server
    return True
