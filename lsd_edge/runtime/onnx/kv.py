"""The decoder's KV cache in ONNX Runtime, torch-free: grown by concatenation, or shared in place.

- `ConcatCache`, for lsd-edge's traced decoder: each call returns `present` = past + the new tokens,
  which is fed back as the next past (on CUDA kept on the device through IO binding).
- `SharedCache`, for the model builder's decoder (GroupQueryAttention): one preallocated buffer per
  layer and key/value, `capacity` positions long, bound once as both `past_key_values.*` and
  `present.*`, so the attention writes the new keys and values in place. Inputs are bound from
  preallocated host arrays and the last position's logits land in one preallocated buffer: a
  decode step allocates nothing. The attention mask's length tells the graph how much of the buffer
  is filled. A generation longer than the capacity moves to a buffer twice as long.

A runner with an int8 GEMM prefill (`lsd_edge.runtime.onnx.prefill`) runs calls of more than one
token through that session instead: with a shared cache, bound to the same buffers.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort


class ConcatCache:
    """Past keys and values of every layer, by decoder input name; numpy arrays or device OrtValues."""

    def __init__(self, tensors: dict, length: int):
        self.tensors = tensors
        self.length = length


def concat_step(runner, embeds: np.ndarray, cache: ConcatCache) -> tuple[np.ndarray, ConcatCache]:
    """One call of a traced decoder: embeds (1, S, D) after `cache` -> logits (1, S, V), the grown cache."""
    b, s = embeds.shape[:2]
    p = cache.length
    feed = {"inputs_embeds": embeds, "attention_mask": np.ones((b, p + s), dtype=np.int64)}
    if runner.has_position_ids:
        feed["position_ids"] = np.broadcast_to(np.arange(p, p + s, dtype=np.int64), (b, s)).copy()
    dec = runner.sessions["decoder_model_merged"]
    if s > 1 and runner.prefill_session is not None:
        dec = runner.prefill_session
    if not runner.io_binding:
        outs = dec.run(["logits", *runner.present_names], {**feed, **cache.tensors})
        return outs[0], ConcatCache(dict(zip(runner.past_names, outs[1:], strict=True)), p + s)
    # The cache never leaves the device: present outputs are bound on it and fed back as the next past.
    binding = dec.io_binding()
    for k, v in feed.items():
        binding.bind_cpu_input(k, v)
    for k, v in cache.tensors.items():
        binding.bind_ortvalue_input(k, v)
    binding.bind_output("logits", "cpu")
    for n in runner.present_names:
        binding.bind_output(n, runner.binding_device, 0)
    dec.run_with_iobinding(binding)
    outs = binding.get_outputs()
    return outs[0].numpy(), ConcatCache(dict(zip(runner.past_names, outs[1:], strict=True)), p + s)


def new_concat_cache(runner, batch: int = 1) -> ConcatCache:
    empty = np.zeros((batch, runner.kv_heads, 0, runner.head_dim), dtype=runner.kv_dtype)
    if runner.io_binding:
        tensors = {
            n: ort.OrtValue.ortvalue_from_numpy(empty, runner.binding_device, 0) for n in runner.past_names
        }
    else:
        tensors = dict.fromkeys(runner.past_names, empty)
    return ConcatCache(tensors, 0)


class SharedCache:
    """One buffer per past/present pair, `capacity` positions long, bound once to a decoder session."""

    def __init__(self, runner, capacity: int):
        self.runner = runner
        self.length = 0
        self.capacity = 0
        dec = runner.sessions["decoder_model_merged"]
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type(
            [1, 1, runner.logit_rows], runner.logits_dtype
        )
        # (session, binding) pairs sharing the buffers: the prompt's (int8 GEMM prefill), then each token's
        self.bindings = [(dec, dec.io_binding())]
        if runner.prefill_session is not None:
            self.bindings.insert(0, (runner.prefill_session, runner.prefill_session.io_binding()))
        for _, binding in self.bindings:
            binding.bind_ortvalue_output("logits", self.logits)
        self.buffers: dict[str, ort.OrtValue] = {}
        self._allocate(max(int(capacity), 1))

    def _allocate(self, capacity: int) -> None:
        """Buffers of `capacity` positions (the filled part of any earlier ones copied in), bound."""
        r = self.runner
        shape = [1, r.kv_heads, capacity, r.head_dim]
        new = {
            n: ort.OrtValue.ortvalue_from_shape_and_type(shape, r.kv_dtype, r.binding_device, 0)
            for n in r.past_names
        }
        if self.buffers and self.length:  # a longer generation than planned: keep what is filled
            for n, old in self.buffers.items():
                kept = np.zeros(shape, dtype=r.kv_dtype)
                kept[:, :, : self.length] = old.numpy()[:, :, : self.length]
                new[n].update_inplace(kept)
        self.buffers, self.capacity = new, capacity
        self.mask = np.ones((1, capacity), dtype=np.int64)
        for _, binding in self.bindings:
            for past, present in zip(r.past_names, r.present_names_by_past, strict=True):
                binding.bind_ortvalue_input(past, new[past])
                binding.bind_ortvalue_output(present, new[past])

    def step(self, embeds: np.ndarray) -> np.ndarray:
        """embeds (1, S, D) after the filled positions -> the last position's logits (1, 1, V)."""
        s = embeds.shape[1]
        if self.length + s > self.capacity:
            self._allocate(max(2 * self.capacity, self.length + s))
        r = self.runner
        embeds = np.ascontiguousarray(embeds, dtype=r.embeds_dtype)
        session, b = self.bindings[0] if s > 1 else self.bindings[-1]
        b.bind_input("inputs_embeds", "cpu", 0, r.embeds_dtype, list(embeds.shape), embeds.ctypes.data)
        n = self.length + s
        b.bind_input("attention_mask", "cpu", 0, np.int64, [1, n], self.mask.ctypes.data)
        session.run_with_iobinding(b)
        self.length = n
        return self.logits.numpy()


def shared_step(runner, embeds: np.ndarray, cache: SharedCache) -> tuple[np.ndarray, SharedCache]:
    return cache.step(embeds), cache
