"""Ray's own view for the admin routes: Serve's status summary and the metrics targets. Both
block (they call the controller / GCS): the ingress runs them in a thread."""

from __future__ import annotations

from typing import Any

from ray import serve


def serve_status_summary() -> dict[str, Any]:
    applications = serve.status().applications
    return {
        name: {
            "status": _enum_name(app_status.status),
            "deployments": {
                deployment: {
                    "status": _enum_name(info.status),
                    "replicas": {_enum_name(k): v for k, v in info.replica_states.items()},
                }
                for deployment, info in app_status.deployments.items()
            },
        }
        for name, app_status in applications.items()
    }


def _enum_name(value: Any) -> str:
    return str(getattr(value, "value", value))


def metrics_export_targets() -> list[str]:
    import ray

    return [
        f"{node['NodeManagerAddress']}:{node['MetricsExportPort']}"
        for node in ray.nodes()
        if node.get("Alive") and node.get("MetricsExportPort")
    ]
