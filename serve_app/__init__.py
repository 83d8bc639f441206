"""serve-app: several LLMs and an embedding model behind one OpenAI-compatible API on Ray Serve."""

__version__ = "0.1.0"
