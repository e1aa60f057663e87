"""The embedded Ray of `detserve serve`: loopback only, token auth on, the token private.

Uses the session's Ray (serve_cluster, started by start_ray as `detserve serve`
starts it) and its YOLO application (yolo_url).
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import encode

pytestmark = pytest.mark.serve

APP = "yolo"  # the session's application (tests/conftest.py, yolo_url)


def replica_pids() -> set[int]:
    from detserve.serve.run import listeners

    return {one.pid for one in listeners() if one.process.startswith("ray::ServeReplica")}


def test_every_socket_of_the_server_listens_on_loopback(yolo_url):
    """Every listening TCP socket and bound UDP socket of the process tree is on loopback: Ray's, HAProxy's, each
    replica's HTTP and gRPC servers (Ray 2.60 binds the replica's gRPC server to [::], serve/replica_grpc.py moves it;
    HAProxy's syslog target over UDP bound a socket to 0.0.0.0, serve/ingress.py drops it)."""
    import ray
    from ray._private import ray_constants

    from detserve.serve.run import exposed_listeners, exposure_line, listeners

    assert ray_constants.ENABLE_RAY_CLUSTER is False
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")

    found = listeners()
    # The scan covers Ray's own processes, not only this one.
    names = {Path(one.process).name for one in found}
    assert {"gcs_server", "raylet"} <= names, names
    from detserve.serve import ingress

    if ingress.chosen() == "haproxy":  # HAProxy and its stats and Prometheus listeners, bound *:8404 and :9101 by Ray's template
        assert sum(Path(one.process).name == "haproxy" for one in found) >= 3, found
        assert not [one for one in found if Path(one.process).name == "haproxy" and one.kind == "udp"], found
    # Cross-check with the system-wide table (a different psutil path).
    tree = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
    system = {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
              if c.pid in tree and (c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and c.laddr))}  # fmt: skip
    assert system == {(one.host, one.port) for one in found}

    assert replica_pids(), "no Serve replica found among the listeners"
    assert exposed_listeners() == [], exposed_listeners()
    assert all(one.host in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for one in found), found
    assert "on 127.0.0.1" in exposure_line()


def test_the_exposure_line_names_what_is_not_on_loopback_and_what_guards_it(monkeypatch):
    from detserve.serve import run

    exposed = [run.Listener("::", 41000, 7, "ray::ServeReplica:yolo:DetectionServer"), run.Listener("0.0.0.0", 5000, 8, "/x/haproxy", "udp")]
    monkeypatch.setattr(run, "listeners", lambda: exposed + [run.Listener("127.0.0.1", 8000, 9, "haproxy")])
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    line = run.exposure_line()
    assert "[::]:41000 (ray::ServeReplica:yolo:DetectionServer)" in line and "0.0.0.0:5000/udp (haproxy)" in line
    assert "127.0.0.1:8000" not in line and "require the Ray token" in line
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert run.exposure_line().startswith("WARNING: Ray token auth is off")
    lines = run.banner(["/yolo"], "127.0.0.1", 8000, 8080, Path("s.jpg"), "Every socket of the server is on 127.0.0.1")
    assert any(line.strip().startswith("listening  Every socket") for line in lines)


def test_the_replica_grpc_patch_binds_the_node_address_ray_passes_on_everything_else(monkeypatch):
    """Against the pinned Ray: the helper its replica module calls with "[::]:0" is the one replaced."""
    import inspect

    import ray
    from ray.serve._private import replica

    from detserve.serve.replica_grpc import WILDCARD, bind_to_node_address

    assert f'add_port_to_grpc_server(self._server, "{WILDCARD}")' in inspect.getsource(replica)  # what the patch relies on
    calls = []
    monkeypatch.setattr(replica, "add_port_to_grpc_server", lambda server, address: calls.append(address) or 1)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    assert bind_to_node_address() and bind_to_node_address()  # twice: wrapped once
    replica.add_port_to_grpc_server(None, WILDCARD)
    replica.add_port_to_grpc_server(None, "10.0.0.5:9000")
    assert calls == ["127.0.0.1:0", "10.0.0.5:9000"]


def grpc_code(target: str, method: str, token: str | None):
    import grpc

    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(method, request_serializer=lambda x: x, response_deserializer=lambda x: x)
        try:
            call(b"", timeout=10, metadata=[("authorization", f"Bearer {token}")] if token else None)
        except grpc.RpcError as err:
            return err.code()
        return grpc.StatusCode.OK


SERVE_GRPC_METHOD = "/ray.serve.ASGIService/HandleRequest"


def serve_grpc_ports(token: str) -> list[int]:
    """The replicas' Serve gRPC ports: of each replica's listeners, the one that knows Serve's ASGI service."""
    import grpc

    from detserve.serve.run import listeners

    ports = []
    for one in listeners():
        if one.process.startswith("ray::ServeReplica") and one.kind == "tcp":
            if grpc_code(f"127.0.0.1:{one.port}", SERVE_GRPC_METHOD, token) not in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED):
                ports.append(one.port)
    return ports


def test_replica_grpc_and_gcs_refuse_calls_without_the_token(yolo_url):
    import grpc
    import ray

    token = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    gcs = ray.get_runtime_context().gcs_address
    get_cluster_id = "/ray.rpc.NodeInfoGcsService/GetClusterId"
    assert grpc_code(gcs, get_cluster_id, token) == grpc.StatusCode.OK  # the probe itself is well formed
    assert grpc_code(gcs, get_cluster_id, None) == grpc.StatusCode.UNAUTHENTICATED
    assert grpc_code(gcs, get_cluster_id, "0" * 64) == grpc.StatusCode.UNAUTHENTICATED
    ports = serve_grpc_ports(token)  # with the token a call gets past auth (and fails on the empty payload)
    assert len(ports) >= len(replica_pids()), ports
    for port in ports:
        target = f"127.0.0.1:{port}"
        assert grpc_code(target, SERVE_GRPC_METHOD, None) == grpc.StatusCode.UNAUTHENTICATED
        assert grpc_code(target, SERVE_GRPC_METHOD, "0" * 64) == grpc.StatusCode.UNAUTHENTICATED


ATTACH = """
import sys
from detserve.serve.run import attach
attach()
from ray import serve
result = serve.get_app_handle({app!r}).predict.remote(open(sys.argv[1], "rb").read()).result(timeout_s=60)
print("results", len(result["results"]))
"""

INTRUDE = """
import os, sys
import ray
try:
    ray.init(address=sys.argv[1], logging_level="ERROR")
except BaseException as exc:
    print("refused", type(exc).__name__)
    sys.exit(3)
print("attached")
"""


@pytest.mark.slow  # a second process attaching to Ray: 20 s (the token files are checked in make test)
def test_attach_finds_the_token_and_a_process_without_it_is_refused(yolo_url, scenes, tmp_path):
    import ray

    image = tmp_path / "scene.png"
    image.write_bytes(encode(scenes[0].image))
    gcs = ray.get_runtime_context().gcs_address
    # Neither child inherits the token or the auth mode: attach() must find them in the run directory.
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    wrong = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}

    def start(code: str, env: dict, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # Concurrently: each refused attach takes Ray's ~20 s of retries.
    children = {
        "attach": start(ATTACH.format(app=APP), base, str(image)),
        "no token": start(INTRUDE, base, gcs),
        "wrong token": start(INTRUDE, wrong, gcs),
    }
    out = {}
    for name, child in children.items():
        try:
            out[name] = (child.wait(timeout=90), child.stdout.read())
        except subprocess.TimeoutExpired:
            child.kill()
            pytest.fail(f"{name}: still running after 90 s")
    rc, text = out["attach"]
    assert rc == 0 and "results 1" in text, text[-2000:]
    for name in ("no token", "wrong token"):
        rc, text = out[name]
        assert rc == 3 and "refused ConnectionError" in text, (name, text[-2000:])
        assert "attached" not in text.splitlines()


def test_the_token_file_is_private_and_not_in_home(serve_cluster):
    import ray

    from detserve.serve import ray_auth

    token = Path(os.environ["RAY_AUTH_TOKEN_PATH"])
    assert token == ray_auth.auth_dir() / "token"
    assert ray_auth.auth_dir().parent == ray_auth.run_dir()
    info, folder = token.stat(), token.parent.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.getuid()
    assert stat.S_IMODE(folder.st_mode) == 0o700 and folder.st_uid == os.getuid()
    assert len(token.read_text().strip()) == 64
    # Ray writes ~/.ray/auth_token (0644) when it finds no token; it must not have.
    home_token = Path.home() / ".ray" / "auth_token"
    gcs_pid = next(p for p in psutil.Process().children(recursive=True) if p.name() == "gcs_server")
    assert not home_token.exists() or home_token.stat().st_mtime < gcs_pid.create_time()
    assert "RAY_AUTH_TOKEN" not in os.environ
    del ray


def test_token_file_is_made_once_private_and_refuses_a_link(tmp_path):
    from detserve.serve import ray_auth

    first = ray_auth.token_file(tmp_path / "run")
    assert stat.S_IMODE(first.stat().st_mode) == 0o600
    assert ray_auth.token_file(tmp_path / "run").read_text() == first.read_text()  # reused, not rotated
    first.chmod(0o644)
    assert stat.S_IMODE(ray_auth.token_file(tmp_path / "run").stat().st_mode) == 0o600
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "auth").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(RuntimeError, match="link"):
        ray_auth.token_file(tmp_path / "linked")


def test_a_host_beyond_loopback_needs_token_auth(monkeypatch):
    from typer.testing import CliRunner

    from detserve.cli import app
    from detserve.serve.run import require_auth_for

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        require_auth_for(host)
    for host in ("0.0.0.0", "::", "192.0.2.2", "myhost.example"):
        with pytest.raises(ValueError, match="RAY_AUTH_MODE"):
            require_auth_for(host)
    started = time.monotonic()
    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--port", "1"])
    assert result.exit_code == 2, result.output
    assert "needs Ray token auth" in result.output and "Traceback" not in result.output
    assert time.monotonic() - started < 5  # refused before exporting models or starting Ray
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    require_auth_for("0.0.0.0")


def test_the_shell_exports_carry_the_offline_environment_and_drop_loopback_for_a_cluster(tmp_path):
    from detserve.runtime import offline

    laptop, cluster = offline.shell_exports(), offline.shell_exports(cluster=True)
    assert "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0\n" in laptop
    assert offline.LOOPBACK_SWITCH not in cluster
    assert "export RAY_AUTH_MODE=token\n" in cluster and "RAY_AUTH_TOKEN" not in cluster.replace("RAY_AUTH_MODE", "")
    # What a shell sources is exactly environment(), less the switch: run it and read the variables back.
    script = tmp_path / "env.sh"
    script.write_text(cluster)
    shown = subprocess.run(["bash", "-c", f". {script} && env -0"], capture_output=True, text=True, check=True, env={}).stdout
    got = dict(line.split("=", 1) for line in shown.split("\0") if "=" in line)
    expected = {k: v for k, v in offline.environment().items() if k != offline.LOOPBACK_SWITCH}
    assert {k: got[k] for k in expected} == expected
