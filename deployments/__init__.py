"""Ray Serve deployments: the ingress, one server per model, and the app builder."""
