"""Inference engine: torch + transformers only (no Ray, no HTTP).

Import the submodules directly; `types` is torch-free so the ingress can share it.
"""
