"""The fuse pass's attention ops, one attention launch each (attention.py's kernel):

- attention_rope: the attention output's RoPE (V4's inverse RoPE), rotated by the program that finishes each
  output row (or the combine kernel) as the rope kernel does, the same bits;
- norm_attention_rope: that, with the rms_norm_rope of its queries (weightless) and of its keys (with kv_norm's
  weight) in the same launch: each program norms and rotates its own query rows, and in a decode step (the
  attention programs encode the new keys, ENCODE_IN_KERNEL) the new keys, with the rms_norm_rope kernel's row code
  (the same bits). In V4 that is every layer's per-head query norm and kv_norm: two launches a layer fewer.
"""

from .attention import _attend
from .common import check, same_device
from .norm import _weight, rope_operands

RMS_NORM_ROPE_ATTRS = {"eps", "inverse", "scale"}


def attention_rope(q, kv, sinks, positions, inv_freq, selected=None, *, state, pos0, window, rate=0, scale,
                   kv_format="f32", rope_dim=0, out_rope, config=None, into=None):
    """rope(attention(q, kv, sinks, selected, ..), positions, inv_freq, **out_rope) in one launch (the fuse pass's
    attention_rope): the program that finishes an output row (or the combine kernel) rotates its trailing
    2 len(inv_freq) channels as the rope kernel does, the same bits. out_rope: the rope's attributes
    {inverse?, scale?}."""
    rope = rope_operands("out_rope", q, positions, inv_freq, out_rope)
    return _attend(q, kv, sinks, selected, state, pos0, window, rate, scale, kv_format, rope_dim, config, into, rope)


def norm_attention_rope(q, kv, kv_weight, sinks, positions, inv_freq, selected=None, *, state, pos0, window, rate=0,
                        scale, kv_format="f32", rope_dim=0, out_rope, q_norm, kv_norm, config=None, into=None):
    """attention_rope(rms_norm_rope(q, positions, inv_freq, **q_norm), rms_norm_rope(kv, positions, inv_freq,
    kv_weight, **kv_norm), ..) in one launch in a decode step (the fuse pass's norm_attention): q [B, S, H, D] and
    kv [B, S, D] are the raw queries and keys. From 5 new tokens on the rms_norm_rope kernel norms the keys first
    (the attention programs encode the keys only of a few tokens). q_norm, kv_norm: {eps, inverse?, scale?}."""
    rope = rope_operands("out_rope", q, positions, inv_freq, out_rope)
    for name, attrs in (("q_norm", q_norm), ("kv_norm", kv_norm)):
        check(isinstance(attrs, dict) and "eps" in attrs and set(attrs) <= RMS_NORM_ROPE_ATTRS,
              f"{name}: expected an rms_norm_rope's attributes {{eps, inverse?, scale?}}, got {attrs!r}")
    kv_weight = _weight(kv_weight, q.shape[-1])
    same_device(q=q, kv_weight=kv_weight)
    return _attend(q, kv, sinks, selected, state, pos0, window, rate, scale, kv_format, rope_dim, config, into, rope,
                   (kv_weight, q_norm, kv_norm))


attention_rope.device_position = True  # takes pos0 as a device tensor (common.position)
norm_attention_rope.device_position = True
LAUNCHERS = {"attention_rope": attention_rope, "norm_attention_rope": norm_attention_rope}
