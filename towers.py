"""The building blocks of the models' towers: the OpenAI-layout text transformer, the SimCLR projection head, and the
helpers that run a timm ViT image tower (class-token-only last block, kept patch tokens, one pass for several views,
views of another size).

The models built from them (CLIP, SIMCLR, SLIP), the registry of names and the switch for the exact shortcuts
(``set_fast_paths``) live in ``models.py``, which re-exports every name here that scripts reach as ``models.X``.
Parameter names are those of the released SLIP checkpoints (OpenAI CLIP's text tower, timm's ViT).

References:
  CLIP: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", arXiv 2103.00020.
  ViT: Dosovitskiy et al., arXiv 2010.11929; timm's ``VisionTransformer`` (its public attributes, as of timm 1.0).
"""
import math
from collections import OrderedDict
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention
from torch.utils.checkpoint import checkpoint


# ----------------------------------------------------------------------------------------------------------------
# Attention heads from one q/k/v projection, in the projection's own memory layout
# ----------------------------------------------------------------------------------------------------------------
def split_heads(qkv: torch.Tensor) -> List[torch.Tensor]:
    """[B, N, P, H, d] (one projection's output viewed as P = 3 or 2 parts of H heads) -> P x [B, H, N, d].

    Unbound along P before the transposes (not permuted first, as timm and PyTorch's MultiheadAttention do): each
    part is a view that keeps the projection's layout, so in the backward the parts' gradients are stacked straight
    into [B, N, P, H, d], which is already the projection's output gradient. Permuting first makes the stack build
    [P, B, H, N, d] and then a second full copy to bring it back (tested: no ``clone`` in the backward)."""
    return [part.transpose(1, 2) for part in qkv.unbind(2)]


class SplitHeadsAttention(TimmAttention):
    """timm's ViT ``Attention`` (same parameters, names and options: q/k norm, scale norm, gate, dropout, masks)
    with its heads taken by ``split_heads``: the same numbers, one full copy fewer in the backward of every block.
    ``use_split_heads`` switches a timm ViT's attention modules to it in place."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, 'gate', None) is not None else None
        q, k, v = split_heads(self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim))  # [B, H, N, d]
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                               dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


SPLIT_HEADS_CHILDREN = {'qkv', 'q_norm', 'k_norm', 'attn_drop', 'norm', 'gate', 'proj', 'proj_drop'}


def use_split_heads(visual: nn.Module) -> int:
    """Switch every timm ``Attention`` of ``visual`` whose parts ``SplitHeadsAttention`` knows to it (the class
    only: parameters, buffers and state_dict keys are untouched); returns how many were switched."""
    switched = 0
    for m in visual.modules():
        if type(m) is TimmAttention and {name for name, _ in m.named_children()} <= SPLIT_HEADS_CHILDREN:
            m.__class__ = SplitHeadsAttention
            switched += 1
    return switched


# ----------------------------------------------------------------------------------------------------------------
# Text tower (OpenAI CLIP layout: the parameter names match nn.MultiheadAttention's, the computation is batch-first)
# ----------------------------------------------------------------------------------------------------------------
class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 for half-precision inputs and cast back, so an fp16 model stays stable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                                self.eps).to(x.dtype)
        return super().forward(x)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def select_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """One token per caption, [B, D]: rows ``rows`` [B] of packed tokens x [T, D], or of padded captions x [B, L, D]
    the token at position ``rows[b]`` of caption b (a gather: no data-dependent shape, no host read)."""
    if x.dim() == 2:
        return x.index_select(0, rows)
    return x.gather(1, rows[:, None, None].expand(-1, 1, x.shape[-1]))[:, 0]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with nn.MultiheadAttention's parameter names (in_proj_*, out_proj).

    ``fused`` selects torch's scaled_dot_product_attention; the plain softmax path is kept for benchmarks.
    """

    fused = True

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, packing: Optional[tuple] = None,
                rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: [B, L, D]; or packed captions [T, D] with ``packing`` = (flat, B, L), where ``flat`` [T] holds each
        token's place in the padded [B * L] grid. The projections then run on the T real tokens only; attention runs
        padded (each caption is a prefix of its row, so under the causal mask the zero padding is never attended).
        With ``rows`` [B] (each caption's last token: its row in the packed [T, D], or its position in the padded
        [B, L, D]), only those queries are computed, each seeing the keys up to its position: [B, D]."""
        D = self.in_proj_weight.shape[1]
        w, b = (self.in_proj_weight, self.in_proj_bias) if rows is None else \
            (self.in_proj_weight[D:], self.in_proj_bias[D:])  # keys and values only: the queries come from `rows`
        qkv = F.linear(x, w, b)  # [..., 3D or 2D]
        if packing is not None:
            flat, B, L = packing
            qkv = qkv.new_zeros(B * L, qkv.shape[-1]).index_copy(0, flat, qkv)
        else:
            B, L = x.shape[:2]
        heads = split_heads(qkv.view(B, L, -1, self.heads, D // self.heads))  # 3 or 2 x [B, H, L, D/H]
        mask = None  # causal
        if rows is None:
            q, k, v = heads
        else:
            k, v = heads
            q = F.linear(select_rows(x, rows), self.in_proj_weight[:D], self.in_proj_bias[:D])
            q = q.view(B, 1, self.heads, -1).transpose(1, 2)  # [B, H, 1, D/H]
            position = rows if packing is None else flat[rows] % L  # each query's place in its caption
            keep = torch.arange(L, device=x.device) <= position[:, None]  # keys up to the query's position
            mask = torch.zeros(B, 1, 1, L, device=x.device, dtype=q.dtype).masked_fill(~keep[:, None, None], -math.inf)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        else:
            if mask is None:
                mask = torch.full((L, L), -math.inf, device=x.device, dtype=q.dtype).triu(1)
            attn = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5) + mask  # [B, H, L or 1, L]
            x = attn.softmax(dim=-1).to(v.dtype) @ v
        x = x.transpose(1, 2).reshape(B, -1, D)  # [B, L or 1, D]
        if rows is not None:
            x = x[:, 0]
        elif packing is not None:
            x = x.reshape(B * L, D).index_select(0, flat)  # back to [T, D]
        return self.out_proj(x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = CausalSelfAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ('c_fc', nn.Linear(width, width * 4)),
            ('gelu', QuickGELU()),
            ('c_proj', nn.Linear(width * 4, width)),
        ]))
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor, packing: Optional[tuple] = None,
                rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """With ``rows``, returns only those rows (their attention still reads every token)."""
        x = (x if rows is None else select_rows(x, rows)) + self.attn(self.ln_1(x), packing, rows)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, packing: Optional[tuple] = None,
                rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``rows``: if given, the last block computes (and returns) only those rows, [B, D] (CausalSelfAttention)."""
        for i, block in enumerate(self.resblocks):
            last_rows = rows if i == self.layers - 1 else None
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, packing, last_rows, use_reentrant=False)
            else:
                x = block(x, packing, last_rows)
        return x


# ----------------------------------------------------------------------------------------------------------------
# SimCLR projection head
# ----------------------------------------------------------------------------------------------------------------
SSL_HEAD_NORMS = ('bn', 'ln', 'none')


def build_mlp(in_dim: int, mlp_dim: int, out_dim: int, norm: str = 'bn') -> nn.Sequential:
    """SimCLR projection head. ``norm`` 'bn' (the original; main.py converts it to SyncBatchNorm in multi-GPU runs),
    'ln' (LayerNorm: no batch statistics) or 'none'; the layers keep the names bn1/bn2 (only 'bn' has the released
    checkpoints' keys)."""
    if norm not in SSL_HEAD_NORMS:
        raise ValueError(f'SSL head norm {norm!r}: expected one of {SSL_HEAD_NORMS}')
    make = {'bn': nn.BatchNorm1d, 'ln': nn.LayerNorm, 'none': lambda dim: nn.Identity()}[norm]
    return nn.Sequential(OrderedDict([
        ('layer1', nn.Linear(in_dim, mlp_dim)),
        ('bn1', make(mlp_dim)),
        ('relu1', nn.ReLU(inplace=True)),
        ('layer2', nn.Linear(mlp_dim, mlp_dim)),
        ('bn2', make(mlp_dim)),
        ('relu2', nn.ReLU(inplace=True)),
        ('layer3', nn.Linear(mlp_dim, out_dim)),
    ]))


# ----------------------------------------------------------------------------------------------------------------
# Image tower (timm ViT): class-token-only last block, kept patch tokens, shared view passes, other view sizes
# ----------------------------------------------------------------------------------------------------------------
def class_token_only_ok(visual: nn.Module) -> bool:
    """True for a timm ViT pooled by its class token whose last block is a plain Block with nothing random."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer
    if not isinstance(visual, VisionTransformer) or visual.global_pool != 'token' or visual.cls_token is None:
        return False
    if getattr(visual, 'attn_pool', None) is not None or not len(visual.blocks) or not hasattr(visual, '_pos_embed'):
        return False
    block = visual.blocks[-1]
    if type(block) is not Block or type(block.attn) not in (Attention, SplitHeadsAttention) or \
            getattr(block.attn, 'gate', None) is not None:
        return False
    return not (block.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in block.modules()))


def keep_tokens(x: torch.Tensor, keep: Optional[torch.Tensor], num_prefix: int = 1) -> torch.Tensor:
    """x [B, P + N, C] (P prefix tokens, then N patch tokens) -> [B, P + n, C]: the prefix tokens first, then the
    patch tokens listed in ``keep`` [B, n] (indices into the N patches). ``keep`` None: x unchanged."""
    if keep is None:
        return x
    C = x.shape[-1]
    patches = x[:, num_prefix:].gather(1, keep[:, :, None].expand(-1, -1, C))
    return torch.cat([x[:, :num_prefix], patches], dim=1)


def vit_embed(visual: nn.Module, x: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A timm ViT's tokens before its blocks: patch and position embedding (timm's own, resampled by its
    ``_pos_embed`` when the tower is dynamic and the view is smaller), then only the kept patch tokens (``keep``
    [B, n], after the position embedding, so every token keeps its place), then timm's patch_drop and norm_pre."""
    x = visual._pos_embed(visual.patch_embed(x))
    x = keep_tokens(x, keep, getattr(visual, 'num_prefix_tokens', 1))
    return visual.norm_pre(visual.patch_drop(x))


def vit_class_token_features(visual: nn.Module, x: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The pooled features of a class-token ViT, with its last block run for the class token alone.

    Only the class token leaves the last block, so there its queries, attention output, projection and MLP are
    needed for one token instead of all of them (keys and values still come from every token): about 7% of a
    ViT-S/B/L pass. Equal to ``visual(x)`` up to float rounding (tested in float64). ``keep``: see ``vit_embed``.
    """
    x = vit_embed(visual, x, keep)
    for block in visual.blocks[:-1]:
        x = checkpoint(block, x, use_reentrant=False) if visual.grad_checkpointing and torch.is_grad_enabled() \
            else block(x)
    block = visual.blocks[-1]
    attn = block.attn
    y = block.norm1(x)  # [B, N, C]
    B, N, _ = y.shape
    H, d, A = attn.num_heads, attn.head_dim, attn.attn_dim
    w, b = attn.qkv.weight, attn.qkv.bias
    q = F.linear(y[:, :1], w[:A], None if b is None else b[:A]).view(B, 1, H, d).transpose(1, 2)  # [B, H, 1, d]
    k, v = split_heads(F.linear(y, w[A:], None if b is None else b[A:]).view(B, N, 2, H, d))  # [B, H, N, d]
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.fused_attn:
        o = F.scaled_dot_product_attention(q, k, v)
    else:
        o = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    o = attn.proj_drop(attn.proj(attn.norm(o.transpose(1, 2).reshape(B, 1, A))))
    x = x[:, :1] + block.drop_path1(block.ls1(o))
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return visual.forward_head(visual.norm(x))  # [B, C]


def vit_masked_features(visual: nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``visual(x)`` (every block in full) on the kept patch tokens and the class token only."""
    x = vit_embed(visual, x, keep)
    for block in visual.blocks:
        x = checkpoint(block, x, use_reentrant=False) if visual.grad_checkpointing and torch.is_grad_enabled() \
            else block(x)
    return visual.forward_head(visual.norm(x))  # [B, C]


def is_vit(visual: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer
    return isinstance(visual, VisionTransformer) and hasattr(visual, '_pos_embed')


def visual_forward(visual: nn.Module, x: torch.Tensor, class_token_only: bool = True,
                   keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``visual(x)``, through the class-token-only last block where the tower allows it; with ``keep`` [B, n], on
    those patch tokens (plus the class token) only (--ssl-mask-ratio, --clip-mask-ratio)."""
    if class_token_only and class_token_only_ok(visual):
        return vit_class_token_features(visual, x, keep)
    if keep is None:
        return visual(x)
    if not is_vit(visual):
        raise ValueError(f'token masking needs a timm ViT image tower, not {type(visual).__name__}')
    return vit_masked_features(visual, x, keep)


def visual_features(visual: nn.Module, views, fuse: bool, class_token_only: bool = False, keeps=None):
    """Backbone features of several image views (each with its kept patch indices or None), batched together where
    allowed and their shapes agree: views of one size and one kept-token count share a pass, in their given order
    (all of them when all agree: one concatenated pass)."""
    keeps = list(keeps) if keeps is not None else [None] * len(views)
    if not fuse or len(views) == 1:
        return [visual_forward(visual, v, class_token_only, k) for v, k in zip(views, keeps)]
    groups: Dict[tuple, List[int]] = {}  # (view shape, kept count or None) -> view positions, first seen first
    for i, (v, k) in enumerate(zip(views, keeps)):
        groups.setdefault((tuple(v.shape), None if k is None else tuple(k.shape)), []).append(i)
    out = [None] * len(views)
    for members in groups.values():
        if len(members) == 1:
            out[members[0]] = visual_forward(visual, views[members[0]], class_token_only, keeps[members[0]])
            continue
        keep = None if keeps[members[0]] is None else torch.cat([keeps[i] for i in members])
        feats = visual_forward(visual, torch.cat([views[i] for i in members]), class_token_only, keep)
        for i, f in zip(members, feats.chunk(len(members))):  # [V*B, C] -> V x [B, C]
            out[i] = f
    return out


def set_dynamic_img_size(visual: nn.Module, enabled: bool = True) -> None:
    """Let a built timm ViT take views of other sizes (multiples of its patch), timm's own way: what
    ``dynamic_img_size=True`` at creation sets (the patch embedding keeps its grid [B, H, W, C] and does not insist
    on the model's size; ``_pos_embed`` then resamples the position embedding with ``resample_abs_pos_embed``, and
    returns it untouched at the model's own size). No parameter or state_dict key changes (--ssl-view-size).
    ``enabled=False`` restores what timm builds by default (fixed size, flattened patch tokens)."""
    from timm.layers import Format
    if not is_vit(visual):
        raise ValueError(f'--ssl-view-size needs a timm ViT image tower, not {type(visual).__name__}')
    visual.dynamic_img_size = enabled
    visual.patch_embed.strict_img_size = not enabled
    visual.patch_embed.flatten = not enabled
    visual.patch_embed.output_fmt = Format.NHWC if enabled else Format.NCHW
