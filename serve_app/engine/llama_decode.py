"""The decode step of a Llama-family model written out: one new token per row, few torch calls.

transformers' forward is general (any q_len, mask kinds, output records, kernel hooks); at one
token per row its Python and small-op overhead is most of a CPU step once the weights are
4-bit: measured ~11 of the 17.6 ms of a SmolLM2 native step at batch 1 (torch.profiler). This
step runs the same modules' weights with the same arithmetic (tests compare its logits with
the model's own forward), and on native weights fuses q/k/v and gate/up into one int4 matmul
each (the fused weight is concatenated once; the separate layers become views of it).

Where decode_kernel.c is built (decode_native.py), the rest of a layer is C too: at rows whose
matmuls are all q4_kernel.c's, the whole layer is one C call (`NativeLayer`); at rows that take
the fp16 copies (fbgemm), the matmuls stay torch's and norms, attention with its cache write
and SiLU x up are C calls between them. Elsewhere the layer is the torch ops below.

Where the C kernels run, prefill forwards come here too (`prefill`: every new token of each
left-padded row, causal attention over its cache columns), at a fraction of transformers'
forward's per-layer overhead (~40 ms for a few tokens of SmolLM2); chunks of long prompts and
every other case keep transformers' forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from serve_app.engine import quantized_linear
from serve_app.engine.batch import GrowingLayer, growing_cache
from serve_app.engine.decode_native import (
    AttentionShape,
    CacheColumns,
    NativeLayer,
    add_rms_norm,
    decode_attention,
    rms_norm,
    silu_mul,
)
from serve_app.engine.q4_native import q4_kernel, torch_threads_of_pool
from serve_app.engine.quantized_linear import Int4Linear, fuse_int4

OnLayer = Callable[[], None]
# A layer's native_max_rows where no fp16 copy takes steps of some row count to torch.
NO_COPY_ROWS = 1 << 30


class LlamaDecodeStep:
    """logits [rows, vocab] of one decode step; the new keys/values go into `cache`."""

    def __init__(self, model: Any) -> None:
        config = model.config
        inner = model.model
        self.head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        self.embed_tokens, self.lm_head = inner.embed_tokens, model.lm_head
        self.final_norm = (inner.norm.weight, inner.norm.variance_epsilon)
        rotary = inner.rotary_emb
        self.inv_freq, self.rotary_scale = rotary.inv_freq.float(), rotary.attention_scaling
        self.layers = [_Layer(layer, self.head_dim) for layer in inner.layers]
        self.in_c = q4_kernel() is not None and all(
            layer.attention_shape.fits_kernel() for layer in self.layers
        )
        # Every layer of every decode step one C call (q4_kernel.c weights, no fp16 copy taking
        # bigger steps to torch's matmuls): the step's parallel loops are work_pool.c's.
        self.layers_on_work_pool = self.in_c and all(
            layer.native is not None and layer.native_max_rows == NO_COPY_ROWS
            for layer in self.layers
        )

    @torch.no_grad()
    def __call__(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: DynamicCache,
        on_layer: OnLayer | None = None,
    ) -> torch.Tensor:
        """input_ids, position_ids [rows, 1]; attention_mask [rows, past + 1] (1 = real)."""
        rows = int(input_ids.shape[0])
        hidden = self.embed_tokens(input_ids).view(rows, -1)
        cos, sin = self._rotary(position_ids.view(rows))
        if self._runs_in_c(hidden, cache):
            self._layers_in_c(hidden, cos, sin, attention_mask, cache, on_layer, tokens=1)
        else:
            mask = attention_mask.bool().view(rows, 1, 1, -1)
            for layer, cache_layer in zip(self.layers, cache.layers, strict=True):
                if on_layer is not None:
                    on_layer()
                hidden = layer(hidden, cos, sin, mask, cache_layer)
        if on_layer is not None:
            on_layer()
        weight, eps = self.final_norm
        return self.lm_head(rms_norm(hidden, weight, eps))

    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: DynamicCache,
    ) -> torch.Tensor:
        """Logits [rows, vocab] of each row's last token, after feeding every token of
        input_ids [rows, tokens] (left-padded) through decode_kernel.c; their keys/values go
        into `cache` (GrowingLayers, see empty_cache) after its columns. attention_mask [rows,
        cache columns + tokens]. Only where `in_c`."""
        rows, tokens = (int(n) for n in input_ids.shape)
        hidden = self.embed_tokens(input_ids).reshape(rows * tokens, -1).contiguous()
        cos, sin = self._rotary(position_ids.reshape(rows * tokens))
        if not self._runs_in_c(hidden, cache):
            raise RuntimeError("prefill in C needs the C kernels and a growing cache")
        self._layers_in_c(hidden, cos, sin, attention_mask, cache, None, tokens)
        last = hidden.view(rows, tokens, -1)[:, -1].contiguous()
        weight, eps = self.final_norm
        return self.lm_head(rms_norm(last, weight, eps))

    def empty_cache(self, rows: int) -> DynamicCache:
        """A growing cache of `rows` rows and no columns yet, for prefill."""
        kv_heads, dim = self.layers[0].attention_shape.kv_heads, self.head_dim
        empty = torch.empty(rows, kv_heads, 0, dim)
        return growing_cache([(empty, empty)] * len(self.layers))

    def _runs_in_c(self, hidden: torch.Tensor, cache: DynamicCache) -> bool:
        """Whether decode_kernel.c takes this step: built here, shapes it takes, float32 rows,
        and a cache whose buffers it can write in place."""
        return (
            self.in_c
            and hidden.dtype == torch.float32
            and all(isinstance(layer, GrowingLayer) for layer in cache.layers)
        )

    def _layers_in_c(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        signed_sin: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: DynamicCache,
        on_layer: OnLayer | None,
        tokens: int,
    ) -> None:
        """Every layer through decode_kernel.c, hidden [rows x tokens, D] updated in place."""
        mask = attention_mask.to(torch.int64).contiguous()
        cos, signed_sin = cos.view(hidden.shape[0], -1), signed_sin.view(hidden.shape[0], -1)
        growing = cast(list[GrowingLayer], cache.layers)  # _runs_in_c checked
        for layer, cache_layer in zip(self.layers, growing, strict=True):
            if on_layer is not None:
                on_layer()
            keys, values, first = cache_layer.next_columns(tokens)
            if first + tokens != mask.shape[1] or keys.dtype != torch.float32:
                raise RuntimeError(f"KV cache of {first} columns for a mask of {mask.shape[1]}")
            columns = CacheColumns(keys, values, first, mask, tokens)
            layer.step_in_c(hidden, cos, signed_sin, columns)
            cache_layer.columns_written(tokens)

    def _rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and the signed sin [rows, 1, head_dim] for `rotate_half` done as a flip:
        rotate_half(x) * sin == flip_halves(x) * (sin with its first half negated)."""
        freqs = positions.float().unsqueeze(1) * self.inv_freq
        cos, sin = freqs.cos() * self.rotary_scale, freqs.sin() * self.rotary_scale
        cos = torch.cat([cos, cos], dim=-1).unsqueeze(1)
        signed_sin = torch.cat([-sin, sin], dim=-1).unsqueeze(1)
        return cos, signed_sin


class _Layer:
    """One decoder layer's weights, its q/k/v and gate/up fused where the kernel allows."""

    def __init__(self, layer: Any, head_dim: int) -> None:
        attention, mlp = layer.self_attn, layer.mlp
        self.input_norm = (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        self.post_norm = (
            layer.post_attention_layernorm.weight,
            layer.post_attention_layernorm.variance_epsilon,
        )
        self.scaling = attention.scaling
        self.q_width = attention.q_proj.out_features
        self.kv_width = attention.k_proj.out_features
        self.qkv = _fused([attention.q_proj, attention.k_proj, attention.v_proj])
        self.gate_up = _fused([mlp.gate_proj, mlp.up_proj])
        self.o_proj, self.down_proj = attention.o_proj, mlp.down_proj
        self.intermediate = mlp.gate_proj.out_features
        self.head_dim, self.num_heads = head_dim, attention.config.num_attention_heads
        kv_heads = self.kv_width // head_dim
        self.attention_shape = AttentionShape(self.num_heads, kv_heads, head_dim, self.scaling)
        self.native, self.native_max_rows = self._native_layer()

    def _native_layer(self) -> tuple[NativeLayer | None, int]:
        """The layer as one C call, and the rows it takes (under any fp16 copy's rows); None
        unless every matmul is q4_kernel.c's (fused, no bias) and the attention fits it."""
        linears = [self.qkv, self.o_proj, self.gate_up, self.down_proj]
        if q4_kernel() is None or not self.attention_shape.fits_kernel():
            return None, 0
        if not all(
            isinstance(x, Int4Linear) and x.q4 is not None and x.bias is None for x in linears
        ):
            return None, 0
        copy_rows = [x.fp16_min_rows for x in linears if x.fp16_parts]
        weights = {
            "qkv": self.qkv.q4,
            "o": self.o_proj.q4,
            "gate_up": self.gate_up.q4,
            "down": self.down_proj.q4,
        }
        native = NativeLayer(weights, (self.input_norm, self.post_norm), self.attention_shape)
        return native, min(copy_rows, default=NO_COPY_ROWS)

    def step_in_c(
        self, hidden: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, cache: CacheColumns
    ) -> None:
        """The layer on hidden [rows, D] in place: one C call where every matmul at this many
        rows is q4_kernel.c's, else C calls between torch's matmuls (the fp16 copies, or the
        weights unpacked to float32 for big prefills)."""
        rows = int(hidden.shape[0])
        if self.native is not None and rows < min(
            self.native_max_rows, quantized_linear.Q4_DEQUANTIZED_MIN_ROWS
        ):
            self.native(hidden, cos, signed_sin, cache)
            return
        with torch_threads_of_pool():  # the matmuls are torch's here
            weight, eps = self.input_norm
            qkv = self._joined(self.qkv, rms_norm(hidden, weight, eps))
            attended = decode_attention(qkv, self.attention_shape, cos, signed_sin, cache)
            weight, eps = self.post_norm
            normed = add_rms_norm(hidden, _project(self.o_proj, attended), weight, eps)
            hidden += _project(self.down_proj, silu_mul(self._joined(self.gate_up, normed)))

    @staticmethod
    def _joined(linears: Any, x: torch.Tensor) -> torch.Tensor:
        """A fused layer's output, or the separate layers' outputs side by side."""
        if isinstance(linears, list):
            return torch.cat([_project(linear, x) for linear in linears], dim=1)
        return _project(linears, x)

    def __call__(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        signed_sin: torch.Tensor,
        mask: torch.Tensor,
        cache_layer: Any,
    ) -> torch.Tensor:
        rows, dim = int(hidden.shape[0]), self.head_dim
        weight, eps = self.input_norm
        qk, v = self._qkv(rms_norm(hidden, weight, eps), rows)
        # q and k rotated in one go, [rows, heads + kv_heads, dim]
        qk = qk * cos + qk.view(rows, -1, 2, dim // 2).flip(2).view(rows, -1, dim) * signed_sin
        keys, values = cache_layer.update(qk[:, self.num_heads :].unsqueeze(2), v)
        attended = F.scaled_dot_product_attention(
            qk[:, : self.num_heads].unsqueeze(2),
            keys,
            values,
            attn_mask=mask,
            scale=self.scaling,
            enable_gqa=True,
        )
        hidden = hidden + _project(self.o_proj, attended.reshape(rows, -1))
        weight, eps = self.post_norm
        gate, up = self._gate_up(rms_norm(hidden, weight, eps))
        return hidden + _project(self.down_proj, F.silu(gate) * up)

    def _qkv(self, x: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k side by side [rows, heads + kv_heads, dim]; v [rows, kv_heads, 1, dim]."""
        if isinstance(self.qkv, list):
            q, k, v = (_project(linear, x) for linear in self.qkv)
            qk = torch.cat([q, k], dim=1)
        else:
            qkv = _project(self.qkv, x)
            qk, v = qkv[:, : self.q_width + self.kv_width], qkv[:, self.q_width + self.kv_width :]
        return qk.view(rows, -1, self.head_dim), v.view(rows, -1, 1, self.head_dim)

    def _gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.gate_up, list):
            gate, up = (_project(linear, x) for linear in self.gate_up)
            return gate, up
        gate_up = _project(self.gate_up, x)
        return gate_up[:, : self.intermediate], gate_up[:, self.intermediate :]


def _project(linear: Any, x: torch.Tensor) -> torch.Tensor:
    """linear(x) as a decode step's rows [M, K]: an int4 layer with an fp16 copy picks by row
    count (decode_rows: no module-call machinery, ~120 calls a step)."""
    return linear.decode_rows(x) if isinstance(linear, Int4Linear) else linear(x)


def _fused(linears: list[Any]) -> Any:
    """One Int4Linear for several with the same input (the originals become views of it), or
    the list itself when they are not all int4 or the kernel's blocks do not line up."""
    if all(isinstance(linear, Int4Linear) for linear in linears):
        fused = fuse_int4(linears)
        if fused is not None:
            return fused
    return linears


def supports_llama_decode(model: Any) -> bool:
    """Llama-architecture models with plain RoPE, SiLU MLP and no biases (SmolLM2, Llama 3)."""
    config = model.config
    rope = getattr(config, "rope_parameters", None) or {}
    return (
        getattr(config, "model_type", None) == "llama"
        and rope.get("rope_type", "default") == "default"
        and config.hidden_act == "silu"
        and not getattr(config, "attention_bias", False)
        and not getattr(config, "mlp_bias", False)
        and getattr(config, "pretraining_tp", 1) == 1
    )
