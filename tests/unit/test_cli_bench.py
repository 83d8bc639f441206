"""`serve-app bench` hands its arguments to benchmarks/serving.py unchanged."""

from __future__ import annotations

import pytest

from serve_app import cli


@pytest.mark.parametrize("argv", [["bench", "--", "--targets", "serve-app"], ["bench"]])
def test_bench_passes_its_arguments_without_the_separator(
    argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(cli.os, "execv", lambda _exe, command: calls.append(command))
    cli.main(argv)
    (command,) = calls
    assert command[1].endswith("benchmarks/serving.py")
    assert command[2:] == argv[2:]
