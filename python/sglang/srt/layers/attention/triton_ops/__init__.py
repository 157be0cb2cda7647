"""Triton kernels of the paged attention backend (decode: split-K flash-decoding; extend: flash
attention over a cached prefix). Both read K/V through req_to_token, one slot per token."""

from sglang.srt.layers.attention.triton_ops.decode_attention import DecodeConfig, decode_attention_fwd, decode_num_splits
from sglang.srt.layers.attention.triton_ops.extend_attention import ExtendConfig, extend_attention_fwd

__all__ = [
    "DecodeConfig",
    "ExtendConfig",
    "decode_attention_fwd",
    "decode_num_splits",
    "extend_attention_fwd",
]
