"""Building the Serve apps must not import torch: the controller builds one app per model."""

from __future__ import annotations

import subprocess
import sys

HEAVY = "{'torch', 'transformers'}"


def test_deployments_app_imports_without_torch_or_transformers() -> None:
    code = f"import sys, deployments.app; print(sorted({HEAVY} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
