"""What Ray gave this replica: device choice follows the allocation, not what is visible."""

from __future__ import annotations

import ray


def replica_has_gpu() -> bool:
    # A replica with num_gpus=0 still sees every GPU of its node (Ray 2.60); only the ids Ray
    # assigned count, so two models never share a GPU by accident.
    try:
        return bool(ray.get_runtime_context().get_accelerator_ids().get("GPU"))
    except Exception:  # not inside a Ray worker (unit tests): no allocation to go by
        return True
