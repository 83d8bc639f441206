"""Peers and helpers of benchmarks/serving.py (servers, load generator, noise, offline engine)."""
