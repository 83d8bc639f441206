"""The service as `make run` starts it has HAProxy in front: the test service's port is bound by
an HAProxy whose backend is the ingress replica's own HTTP server (Serve's HAProxy mode), and a
stream comes through it whole."""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration


def haproxy_configs() -> list[str]:
    """The config text of every HAProxy running on this machine."""
    texts = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"/haproxy") and b"-f" in argv:
            config = Path(argv[argv.index(b"-f") + 1].decode())
            if config.exists():
                texts.append(config.read_text())
    return texts


def test_the_service_port_is_haproxys_forwarding_to_the_ingress_replica(service_url: str) -> None:
    if os.environ.get("SERVE_APP_URL"):
        pytest.skip("an external service: how it was started is not ours to check")
    port = service_url.rsplit(":", 1)[1]
    fronts = [text for text in haproxy_configs() if f"bind 127.0.0.1:{port}\n" in text]
    assert len(fronts) == 1, "no HAProxy binds the service's port"
    ingress_server = r"server SERVE_REPLICA_serve-app-Ingress-\S+ 127\.0\.0\.1:(\d+)"
    replicas = re.findall(ingress_server, fronts[0])
    assert replicas and port not in replicas
    body = {
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 8,
        "stream": True,
    }
    with httpx.stream("POST", f"{service_url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 3
