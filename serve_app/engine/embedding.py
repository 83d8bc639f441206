"""Sentence embeddings: mean pooling over real tokens, unit length (as OpenAI returns them)."""

from __future__ import annotations

import threading
from typing import Any

import torch


class EmbeddingEngine:
    """Encodes texts with one model. Thread-safe: one forward pass at a time."""

    def __init__(self, model: Any, tokenizer: Any, *, max_model_len: int, max_batch_size: int):
        self.model = model
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_batch_size = max_batch_size
        self.device = next(model.parameters()).device
        self._lock = threading.Lock()

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(texts)["input_ids"]]

    def embed(self, texts: list[str]) -> list[list[float]]:
        vectors: list[list[float]] = []
        for start in range(0, len(texts), self.max_batch_size):
            vectors.extend(self._embed_batch(texts[start : start + self.max_batch_size]))
        return vectors

    def _embed_batch(self, texts: list[str]) -> list[list[float]]:
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_model_len, return_tensors="pt"
        ).to(self.device)
        with self._lock, torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled.float(), dim=-1).tolist()
