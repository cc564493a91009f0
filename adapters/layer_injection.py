"""Layer-aware ID injection (FantasyID): after DiT block i, video tokens only,

    h_video <- h_video + strength * LayerAttention_i(ID tokens, h_video)

Generic over the base model: the caller says which part of a block's output holds the video tokens. Upstream applies
it after every block (`cross_attn_interval` 1, module index = block index // interval, on blocks where
index % interval == 0), with no gate and strength 1; text tokens are untouched. Batch-1 ID tokens broadcast over the
CFG batch, so both branches get the ID as upstream.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.nn as nn


class LayerInjector:
    def __init__(
        self,
        layer_attention: Sequence[nn.Module],
        id_tokens: torch.Tensor,
        strength: float = 1.0,
        block_start: int = 0,
        block_end: Optional[int] = None,
        interval: int = 1,
        video_tokens: slice = slice(None),
        active: Optional[Callable[[], bool]] = None,
    ):
        if id_tokens.ndim != 3:
            raise ValueError(f"ID tokens must be (B, N, C), got shape {tuple(id_tokens.shape)}.")
        if interval < 1:
            raise ValueError("interval must be >= 1.")
        self.layer_attention = layer_attention
        self.id_tokens = id_tokens
        self.strength = float(strength)
        self.block_start = int(block_start)
        self.block_end = block_end
        self.interval = int(interval)
        self.video_tokens = video_tokens
        self.active = active  # e.g. a start/end-percent check supplied by the sampler hook

    def module_for(self, block_index: int) -> Optional[nn.Module]:
        if block_index % self.interval:
            return None
        if block_index < self.block_start or (self.block_end is not None and block_index >= self.block_end):
            return None
        idx = block_index // self.interval
        if idx >= len(self.layer_attention):
            return None
        return self.layer_attention[idx]

    def apply(self, block_index: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """Block output (B, N, D) -> the same with the video-token slice updated (new tensor; input untouched)."""
        if self.strength == 0.0 or (self.active is not None and not self.active()):
            return hidden_states
        la = self.module_for(block_index)
        if la is None:
            return hidden_states
        video = hidden_states[:, self.video_tokens]
        ids = self.id_tokens.to(device=video.device, dtype=video.dtype)
        delta = la(ids, video)
        if self.video_tokens == slice(None):
            return hidden_states + self.strength * delta
        out = hidden_states.clone()
        out[:, self.video_tokens] = video + self.strength * delta
        return out

    def register(self, blocks: Sequence[nn.Module], output_index: Optional[int] = None) -> List:
        """Forward hooks on `blocks` (block i -> index i). `output_index`: which element of a tuple output holds the
        hidden states (e.g. 0 for blocks returning (video, text)). Returns the hook handles (call .remove())."""
        handles = []
        for i, block in enumerate(blocks):
            def hook(module, args, output, i=i):
                if output_index is None:
                    return self.apply(i, output)
                out = list(output)
                out[output_index] = self.apply(i, out[output_index])
                return type(output)(out) if isinstance(output, tuple) else out

            handles.append(block.register_forward_hook(hook))
        return handles
