"""The serve-app CLI against the real service: status and the streaming terminal chat."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).parent / "serve-app")


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], input=stdin, capture_output=True, text=True, timeout=180)


def test_status_lists_models_replicas_and_health(service_url: str) -> None:
    result = run_cli("status", "--url", service_url)
    assert result.returncode == 0, result.stderr
    for model in ("smollm2-135m-instruct", "gemma-3-270m", "all-minilm-l6-v2"):
        assert model in result.stdout
    assert "health: 200" in result.stdout and "RUNNING" in result.stdout


def test_chat_streams_a_reply_per_message(service_url: str) -> None:
    result = run_cli(
        "chat",
        "--url",
        service_url,
        "--max-tokens",
        "40",
        stdin="What is the capital of France?\nAnd of Italy?\n/exit\n",
    )
    assert result.returncode == 0, result.stderr
    # One reply per line sent, each ended by a newline; greedy output itself is covered by
    # test_api (fp32 on a loaded CPU can flip a near-tie, so no exact text here).
    replies = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(replies) >= 2 and "[error]" not in result.stdout, result.stdout


def test_chat_reports_errors_without_crashing(service_url: str) -> None:
    result = run_cli("chat", "--url", service_url, "--model", "no-such-model", stdin="hi\n")
    assert result.returncode == 0
    assert "[error]" in result.stdout and "no-such-model" in result.stdout
