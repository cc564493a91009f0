"""FantasyID face abstractor: 5 EVA-CLIP hidden states -> 36 face tokens (C-Abstractor, timm RegStage blocks).

The released module holds 10 [C-Abstractor, FeedForward] layers (2 per CLIP scale), 5 input mappings, an unused
latent array and an unused id-embedding mapping; its effective computation is much smaller, and quirky:

* for each scale i the context is `mapping_i(hidden_i)[:, 1:]` (CLS dropped) and each of the scale's layers computes
  `x2 = FF(CAbstractor(context))` - not chained, not residual - so only the last layer of the last scale survives;
* the C-Abstractor adds its positional embedding **in place** to its input, which is a view of the shared context, so
  the k-th layer of a scale sees `context + pos_emb_(first) + ... + pos_emb_(k)`.

Hence output = proj_out-projection of FF_last(CAbs_last(mapping_last(h_last)[:, 1:] + sum of the last scale's
pos_embs, without adding pos_emb again)). All released parameters are kept so the checkpoint loads strictly.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn as nn


def _reg_stage(depth: int, cin: int, cout: int) -> nn.Module:
    from timm.layers import LayerNorm2d  # lazy: timm is heavy
    from timm.models.regnet import RegStage

    return RegStage(depth, cin, cout, stride=1, dilation=1, act_layer=nn.SiLU, norm_layer=LayerNorm2d)


class CAbstractor(nn.Module):
    """Honeybee-style C-Abstractor as configured in FantasyID (576 -> 36 tokens, hidden 256).

    net = RegStage(depth, C_in->hidden) -> AdaptiveAvgPool2d(sqrt(Q)) -> RegStage(depth, hidden->hidden), timm blocks
    with SiLU and norm_layer=LayerNorm2d (inside timm's ConvNormAct that becomes LayerNormAct2d, eps 1e-5);
    readout = Linear(hidden, C_out), SiLU, Linear(C_out, C_out).
    """

    def __init__(
        self,
        num_input_tokens: int = 576,
        encoder_hidden_size: int = 1024,
        hidden_size: int = 256,
        output_hidden_size: int = 1024,
        num_query_tokens: int = 36,
        depth: int = 3,
        mlp_depth: int = 2,
    ):
        super().__init__()
        side = int(round(num_query_tokens ** 0.5))
        if side * side != num_query_tokens:
            raise ValueError(f"num_query_tokens must be a square number, got {num_query_tokens}.")
        in_side = int(round(num_input_tokens ** 0.5))
        if in_side * in_side != num_input_tokens:
            raise ValueError(f"num_input_tokens must be a square number, got {num_input_tokens}.")
        self.num_input_tokens = num_input_tokens
        self.pos_emb = nn.Parameter(torch.zeros(1, num_input_tokens, encoder_hidden_size))
        nn.init.trunc_normal_(self.pos_emb, mean=0.0, std=0.02)
        self.net = nn.Sequential(
            _reg_stage(depth, encoder_hidden_size, hidden_size),
            nn.AdaptiveAvgPool2d((side, side)),
            _reg_stage(depth, hidden_size, hidden_size),
        )
        layers = [nn.Linear(hidden_size, output_hidden_size)]
        for _ in range(1, mlp_depth):
            layers += [nn.SiLU(), nn.Linear(output_hidden_size, output_hidden_size)]
        self.readout = nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The abstractor without its positional embedding: (B, N, C) -> (B, Q, C_out)."""
        b, n, c = x.shape
        if n != self.num_input_tokens:
            raise ValueError(f"C-Abstractor expects {self.num_input_tokens} tokens (CLS removed), got {n}.")
        side = int(round(n ** 0.5))
        x = x.transpose(1, 2).reshape(b, c, side, side)
        x = self.net(x)
        x = x.flatten(2).transpose(1, 2)
        return self.readout(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Adds pos_emb out of place (the in-place sharing quirk is reproduced by FaceAbstractor)."""
        return self.forward_features(x + self.pos_emb.to(x.dtype))


def face_feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


def face_mapping(cin: int, hidden: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(cin, hidden),
        nn.LayerNorm(hidden),
        nn.LeakyReLU(),
        nn.Linear(hidden, hidden),
        nn.LayerNorm(hidden),
        nn.LeakyReLU(),
        nn.Linear(hidden, cout),
    )


class FaceAbstractor(nn.Module):
    """Released `face_abstractor` layout; forward = its effective computation -> (B, 36, output_dim)."""

    def __init__(
        self,
        dim: int = 1024,
        vision_dim: int = 1024,
        depth: int = 10,
        num_scales: int = 5,
        num_queries: int = 144,
        num_id_token: int = 5,
        id_dim: int = 1280,
        output_dim: int = 2048,
        ff_mult: int = 4,
        num_input_tokens: int = 576,
        num_query_tokens: int = 36,
        cabs_hidden: int = 256,
    ):
        super().__init__()
        if depth % num_scales:
            raise ValueError(f"depth ({depth}) must be a multiple of the number of CLIP scales ({num_scales}).")
        self.dim = dim
        self.num_scales = num_scales
        self.per_scale = depth // num_scales
        self.num_input_tokens = num_input_tokens
        scale = dim ** -0.5
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) * scale)  # unused upstream
        self.proj_out = nn.Parameter(scale * torch.randn(dim, output_dim))
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    CAbstractor(num_input_tokens, dim, cabs_hidden, dim, num_query_tokens),
                    face_feed_forward(dim, ff_mult),
                ]
            )
            for _ in range(depth)
        )
        for i in range(num_scales):
            setattr(self, f"mapping_{i}", face_mapping(vision_dim, vision_dim, dim))
        self.id_embedding_mapping = face_mapping(id_dim, vision_dim, dim * num_id_token)  # unused upstream

    def effective_layer_indices(self):
        last = self.num_scales - 1
        return list(range(last * self.per_scale, (last + 1) * self.per_scale))

    def drop_unused(self) -> "FaceAbstractor":
        """Free the parameters that cannot affect the output (about 90 % of the module at the released size).

        Keeps mapping_<last>, the positional embeddings of the last scale's layers, the last layer and proj_out.
        Afterwards the module no longer loads a full released state dict; call it after loading.
        """
        idx = self.effective_layer_indices()
        for j in range(len(self.layers)):
            if j not in idx:
                self.layers[j] = nn.ModuleList()
            elif j != idx[-1]:
                cabs = self.layers[j][0]
                cabs.net = nn.Identity()
                cabs.readout = nn.Identity()
                self.layers[j] = nn.ModuleList([cabs, nn.Identity()])
        for i in range(self.num_scales - 1):
            setattr(self, f"mapping_{i}", nn.Identity())
        self.id_embedding_mapping = nn.Identity()
        self.latents = None
        return self

    def forward(self, hidden_states: Union[Sequence[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """hidden_states: the 5 EVA-CLIP hidden states (each (B, 1 + N, vision_dim)); only the last one matters."""
        if isinstance(hidden_states, torch.Tensor):
            hidden_states = list(hidden_states.unbind(0)) if hidden_states.ndim == 4 else [hidden_states]
        if len(hidden_states) not in (1, self.num_scales):
            raise ValueError(
                f"face abstractor expects {self.num_scales} CLIP hidden states (or just the last one), "
                f"got {len(hidden_states)}."
            )
        h = hidden_states[-1]
        if h.ndim != 3 or h.shape[1] != self.num_input_tokens + 1:
            raise ValueError(
                f"CLIP hidden state must be (B, {self.num_input_tokens + 1}, C) with the CLS token first, "
                f"got shape {tuple(h.shape)}."
            )
        mapping = getattr(self, f"mapping_{self.num_scales - 1}")
        ctx = mapping(h)[:, 1:]
        idx = self.effective_layer_indices()
        # in-place quirk: every layer of the scale added its pos_emb to the shared context before the last one ran
        for i in idx:
            ctx = ctx + self.layers[i][0].pos_emb.to(ctx.dtype)
        cabs, ff = self.layers[idx[-1]]
        x2 = ff(cabs.forward_features(ctx))
        return x2 @ self.proj_out.to(x2.dtype)
