"""The attention computations of onnxruntime's fused ops (com.microsoft Attention after its projection,
MultiHeadAttention) and of ONNX's own Attention (opset 23), as torch modules for their converters
(``converters.fused_ops``, ``converters.onnx_ops``).

Each masks its scores the way onnxruntime's CPU kernel does, which tests/test_fused.py compares: a key
masked by a mask_index or a 0 in a mask gets ``mask_filter_value`` added (onnxruntime adds it, it does not
replace the score), a causal mask counts the past's keys first (onnxruntime aligns it to the lower right).
"""

from __future__ import annotations

import math

import torch
from onnx2torch.utils.common import OnnxToTorchModule
from torch import nn


def _keep(mask: torch.Tensor | None, unidirectional: bool, b: int, s: int, total: int, device) -> torch.Tensor | None:
    """[B or 1, 1, S or 1, T] booleans: which of the T keys each of the S queries attends to (None: all).

    A 1-D mask gives each row's end (keys at or past it are masked; with 2B entries, also its start), a 2-D
    [B, T] or 3-D [B, S, T] one masks its zero entries; ``unidirectional`` masks the keys after a query's
    position (the past's keys come first).
    """
    keys = torch.arange(total, device=device)
    keep = None
    if mask is not None:
        if mask.dim() == 1:
            keep = keys < mask[:b].reshape(b, 1)
            if mask.numel() == 2 * b:
                keep = keep & (keys >= mask[b:].reshape(b, 1))
            keep = keep[:, None, None, :]
        elif mask.dim() == 2:
            keep = (mask != 0)[:, None, None, :]
        elif mask.dim() == 3:
            keep = (mask != 0)[:, None]
        else:  # onnxruntime's CPU kernel refuses the 4-D (Megatron) mask too
            raise ValueError(f"a {mask.dim()}-D attention mask is not supported")
    if unidirectional:
        queries = torch.arange(s, device=device) + (total - s)
        causal = (keys[None, :] <= queries[:, None])[None, None]
        keep = causal if keep is None else keep & causal
    return keep


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None, mask_filter_value: float,
            scale: float, bias: torch.Tensor | None) -> torch.Tensor:
    """softmax(scale * q k^T + mask_filter_value where not kept (+ bias)) v over heads [B, N, S or T, h], as
    [B, S, N * h_v]: the mask is added to the scores as onnxruntime adds it, so a fully masked row comes out as
    its kernel's does."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * (scale or 1.0 / math.sqrt(q.shape[-1]))
    if keep is not None:
        # onnxruntime's contrib kernels add mask_filter_value; ONNX's Attention sets -inf (masked_fill keeps it
        # exact where adding -inf would turn a -inf score into NaN).
        scores = (scores.masked_fill(~keep, mask_filter_value) if math.isinf(mask_filter_value)
                  else scores + torch.where(keep, 0.0, mask_filter_value).to(scores.dtype))
    if bias is not None:
        scores = scores + bias
    out = torch.matmul(torch.softmax(scores, -1), v)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, N * h] -> [B, N, L, h]; a tensor already [B, N, L, h] is kept."""
    return t if t.dim() == 4 else t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


class OnnxAttentionCore(nn.Module, OnnxToTorchModule):
    """com.microsoft.Attention after its projection: ``qkv`` [B, S, q + k + v] split into heads, the keys and
    values after the ``past`` ones (given "p"), the mask_index ("m") and attention_bias ("b") as ``_keep`` and
    ``_attend`` take them; ``present`` stacks the keys and values [2, B, heads, T, head size]."""

    def __init__(self, heads: int, sizes: list[int], unidirectional: bool, mask_filter_value: float,
                 scale: float, given: str, present: bool) -> None:
        super().__init__()
        self.heads, self.sizes, self.unidirectional = heads, sizes, unidirectional
        self.mask_filter_value, self.scale, self.given, self.present = mask_filter_value, scale, given, present

    def forward(self, qkv: torch.Tensor, *extra: torch.Tensor):  # noqa: D102
        given = dict(zip(self.given, extra))
        q, k, v = (_heads(t, self.heads) for t in (qkv.split(self.sizes, -1) if self.sizes else qkv.chunk(3, -1)))
        if "p" in given:
            k, v = torch.cat([given["p"][0], k], 2), torch.cat([given["p"][1], v], 2)
        keep = _keep(given.get("m"), self.unidirectional, qkv.shape[0], qkv.shape[1], k.shape[2], qkv.device)
        out = _attend(q, k, v, keep, self.mask_filter_value, self.scale, given.get("b"))
        return (out, torch.stack([k, v])) if self.present else out


class OnnxMultiHeadCore(nn.Module, OnnxToTorchModule):
    """com.microsoft.MultiHeadAttention: query [B, S, D], key and value [B, L, D] (or already [B, N, L, h], a
    cross-attention's cached keys), given as letters: "k" key, "v" value, "q" bias [D + D + D_v] added to the
    three (to the query only where key and value come as heads), "m" key_padding_mask, "b" attention_bias,
    "K" / "V" past_key / past_value [B, N, P, h] before the keys; outputs the result and, when asked, the
    present keys and values [B, N, T, h]."""

    def __init__(self, heads: int, unidirectional: bool, mask_filter_value: float, scale: float, given: str,
                 presents: int) -> None:
        super().__init__()
        self.heads, self.unidirectional, self.mask_filter_value = heads, unidirectional, mask_filter_value
        self.scale, self.given, self.presents = scale, given, presents

    def forward(self, query: torch.Tensor, *extra: torch.Tensor):  # noqa: D102
        given = dict(zip(self.given, extra))
        if "k" not in given or "v" not in given or query.dim() != 3:
            raise ValueError("MultiHeadAttention with packed query, key and value is not supported")
        q, k, v = query, given["k"], given["v"]
        if "q" in given:
            d = q.shape[-1]
            q = q + given["q"][:d]
            if k.dim() == 3:
                k, v = k + given["q"][d:2 * d], v + given["q"][2 * d:]
        q, k, v = (_heads(t, self.heads) for t in (q, k, v))
        if "K" in given:
            k, v = torch.cat([given["K"], k], 2), torch.cat([given["V"], v], 2)
        keep = _keep(given.get("m"), self.unidirectional, q.shape[0], q.shape[2], k.shape[2], query.device)
        out = _attend(q, k, v, keep, self.mask_filter_value, self.scale, given.get("b"))
        return (out, k, v)[:1 + self.presents] if self.presents else out


class OnnxAttention(nn.Module, OnnxToTorchModule):
    """ONNX's Attention (opset 23): Q [B, qN, S, h] and K, V [B, kvN, L, h] (or [B, S, N * h] with q_num_heads /
    kv_num_heads), kvN dividing qN (grouped queries share a key head), ``past_key`` / ``past_value`` before the
    keys, ``attn_mask`` boolean (True attends) or added to the scores, ``is_causal`` aligned to the lower right
    as onnxruntime aligns it; returns Y in Q's layout and, when the node asks, the present keys and values."""

    def __init__(self, causal: bool, scale: float, q_heads: int, kv_heads: int, outputs: int) -> None:
        super().__init__()
        self.causal, self.scale, self.q_heads, self.kv_heads, self.outputs = causal, scale, q_heads, kv_heads, outputs

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,  # noqa: D102
                attn_mask: torch.Tensor | None = None, past_key: torch.Tensor | None = None,
                past_value: torch.Tensor | None = None):
        flat = q.dim() == 3
        q = _heads(q, self.q_heads)
        k, v = _heads(k, self.kv_heads), _heads(v, self.kv_heads)
        if past_key is not None:
            k, v = torch.cat([past_key, k], 2), torch.cat([past_value, v], 2)
        present = (k, v)
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        s, total = q.shape[2], k.shape[2]
        keep = _keep(None, self.causal, q.shape[0], s, total, q.device)
        bias = None
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                keep = attn_mask if keep is None else keep & attn_mask
            else:
                bias = attn_mask
        out = _attend(q, k, v, keep, float("-inf"), self.scale, bias)
        if not flat:
            out = out.reshape(q.shape[0], s, q.shape[1], -1).transpose(1, 2)
        return (out, *present)[:self.outputs] if self.outputs > 1 else out
