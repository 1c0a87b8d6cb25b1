"""KV caches of the ensemble's streams: preallocated buffers (no per-step copy of the whole cache), forking one
prefill into many row layouts, and the measured bytes per row and position (the memory budget)."""

from __future__ import annotations

import copy
from typing import Any

import torch


def _buffered_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class BufferedLayer(DynamicLayer):
        """A DynamicLayer over a buffer preallocated to the final length: each step writes its key/value in place
        and attention reads a view, instead of ``torch.cat`` copying the whole cache every step."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
            super().__init__()
            self._k = self._alloc(keys, capacity)
            self._v = self._alloc(values, capacity)
            self._n = keys.shape[-2]
            self.device = keys.device
            self.is_initialized = True
            self._views()

        @staticmethod
        def _alloc(t: torch.Tensor, capacity: int) -> torch.Tensor:
            buf = t.new_empty(*t.shape[:-2], max(capacity, t.shape[-2]), t.shape[-1])
            buf[..., : t.shape[-2], :] = t
            return buf

        def _views(self) -> None:
            self.keys = self._k[..., : self._n, :]
            self.values = self._v[..., : self._n, :]

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
                   ) -> tuple[torch.Tensor, torch.Tensor]:
            m = key_states.shape[-2]
            if self._n + m > self._k.shape[-2]:  # out of room: grow (not expected within max_new_tokens)
                self._k = self._alloc(self.keys, 2 * (self._n + m))
                self._v = self._alloc(self.values, 2 * (self._n + m))
            self._k[..., self._n:self._n + m, :] = key_states
            self._v[..., self._n:self._n + m, :] = value_states
            self._n += m
            self._views()
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self._k, self._v = self._k[indices], self._v[indices]
            self._views()

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            self.batch_select_indices(beam_idx)

        def crop(self, tokens_to_remove: int) -> None:
            self._n -= abs(tokens_to_remove)
            self._views()

    return BufferedLayer


_BUFFERED: type | None = None


def fork_cache(cache: Any, idx: torch.Tensor, capacity: int | None = None,
               trunk: tuple[int, torch.Tensor] = (0, torch.empty(0))) -> Any:
    """A new cache holding rows ``idx`` of ``cache`` (which is left untouched). With ``capacity``, plain
    ``DynamicLayer`` layers become preallocated buffers of that many positions (no per-step copy).
    ``trunk`` = (L, groups): the first L layers are a shared trunk holding one row per group; they take rows
    ``groups`` instead."""
    global _BUFFERED
    from transformers import EncoderDecoderCache
    from transformers.cache_utils import DynamicLayer

    if isinstance(cache, EncoderDecoderCache):
        return EncoderDecoderCache(fork_cache(cache.self_attention_cache, idx, capacity, trunk),
                                   fork_cache(cache.cross_attention_cache, idx, None, trunk))
    if capacity is not None:
        _BUFFERED = _BUFFERED or _buffered_layer_class()
    new = copy.copy(cache)
    layers = []
    for i, layer in enumerate(cache.layers):
        rows = trunk[1] if i < trunk[0] else idx
        if capacity is not None and type(layer) in (DynamicLayer, _BUFFERED) and layer.is_initialized \
                and layer.keys.numel():
            layers.append(_BUFFERED(layer.keys[rows], layer.values[rows], capacity))
        else:
            layer = copy.copy(layer)
            layer.batch_select_indices(rows)
            layers.append(layer)
    new.layers = layers
    return new


def cache_bytes_per_row_token(cache: Any, rows: int) -> float:
    """Measured KV-cache bytes per row and cached position (any architecture), for the memory budget."""
    from transformers import EncoderDecoderCache

    caches = [cache.self_attention_cache, cache.cross_attention_cache] if isinstance(cache, EncoderDecoderCache) \
        else [cache]
    total, length = 0, 1
    for c in caches:
        for layer in c.layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor) and t.ndim >= 3:
                    total += t.numel() * t.element_size()
                    length = max(length, t.shape[-2])
    return total / max(1, rows) / length
