"""CLIP, SimCLR and SLIP models with the exact parameter layout of the released SLIP checkpoints, and their registry.

The nine released architectures (``CLIP_VITS16`` ... ``SLIP_VITL16``) are module-level callables, as in the
original code, so ``getattr(models, args.model)(ssl_mlp_dim=4096, ssl_emb_dim=256)`` builds a model whose
``state_dict()`` loads a released checkpoint with ``strict=True`` once the DDP ``module.`` prefix is stripped.
Every name is recorded in ``MODELS`` together with its family (clip / simclr / slip), input resolution and default
SSL-head sizes; scripts read the family from there and never from the name.

The towers' building blocks (text transformer, SSL head, the timm ViT helpers) live in ``towers.py``; the names
scripts reach as ``models.X`` (``visual_forward``, ``set_dynamic_img_size``, ``CausalSelfAttention``, ...) are
re-exported here. The original's calls work beside ours: ``model(image, text)`` (CLIP), ``model(aug1, aug2)``
(SimCLR), ``model(image, text, aug1, aug2)`` (SLIP) and ``get_loss(name, ssl_temp, ssl_scale)``.

Three shortcuts skip work that cannot change the result (all switchable, all tested against the plain computation):
  * SLIP and SimCLR run their image views through the ViT in one concatenated pass (a ViT has no batch statistics);
    the BatchNorm SSL head still sees each view separately, as in the original.
  * Only the class token leaves a ViT, so its last block computes queries, projection and MLP for that token alone.
  * Under the causal mask nothing after a caption's end-of-text token can reach its embedding, so each caption runs
    only up to that token: packed ([total tokens, width]) for every projection and MLP on the CPU, or padded to the
    batch's length the collate chose (--text-pad-multiple) with no host sync on an accelerator and under compile.

Cheaper SimCLR views (main.py's --ssl-view-size, --ssl-mask-ratio, --clip-mask-ratio; off by default): the ViT
takes smaller views through timm's own resampled position embedding (``set_dynamic_img_size``), and a view whose
batch carries kept patch indices runs its blocks on those patches and the class token only (``vit_embed``).

References:
  SLIP: Mu et al., "SLIP: Self-supervision meets Language-Image Pre-training", arXiv 2112.12750.
  CLIP: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", arXiv 2103.00020.
  MoCo v3 ViT-S (12 heads): Chen et al., arXiv 2104.02057.
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import timm
import torch
import torch.nn as nn

import augment
import losses
import utils
from towers import (SSL_HEAD_NORMS, CausalSelfAttention, LayerNorm, QuickGELU,  # noqa: F401 (re-exported)
                    ResidualAttentionBlock, SplitHeadsAttention, TimmAttention, Transformer, build_mlp,
                    class_token_only_ok, is_vit, keep_tokens, set_dynamic_img_size, split_heads, use_split_heads,
                    visual_features, visual_forward, vit_class_token_features, vit_embed, vit_masked_features)

LOGIT_SCALE_INIT = float(np.log(1 / 0.07))  # CLIP's initial temperature
CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408
_class_token_only_ok = class_token_only_ok  # its name before towers.py (tests and notebooks use it)


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------
def as_batch(names: Tuple[str, ...], inputs: tuple) -> augment.Batch:
    """What a forward runs on: its first input when that is an ``augment.Batch`` (ours), else the original SLIP's
    positional tensors (``names`` the Batch fields they fill, in the original's argument order). Float views are
    used as they come (ImageNet-normalised [B, 3, H, W], as the original's loaders made them); text is [B, 77] ids."""
    first, rest = inputs[0], inputs[1:]
    if isinstance(first, augment.Batch):
        if any(x is not None for x in rest):
            raise TypeError('forward takes an augment.Batch or the separate input tensors, not both')
        return first
    missing = [name for name, x in zip(names, inputs) if x is None]
    if missing:
        raise TypeError(f'forward({", ".join(names)}): missing {", ".join(missing)} (or pass an augment.Batch)')
    return augment.Batch(**dict(zip(names, inputs)))


class CLIP(nn.Module):
    """Image-text contrastive model. forward(batch) -> {'image_embed', 'text_embed', 'logit_scale'}.

    Every model is ``head(towers(batch))``: ``towers`` computes what is per sample, ``head`` what couples the batch's
    samples before the loss (here the temperature; SLIP/SimCLR's BatchNorm SSL head), so that the training engine
    can run the towers per micro-batch and the head once on the whole accumulated batch.
    """

    def __init__(self, embed_dim: int, vision_width: int, vision_model: nn.Module, context_length: int = CONTEXT_LENGTH,
                 vocab_size: int = VOCAB_SIZE, transformer_width: int = 512, transformer_heads: int = 8,
                 transformer_layers: int = 12, fuse_views: bool = True):
        super().__init__()
        # Attribute order defines the state_dict order of the released checkpoints.
        self.context_length = context_length
        self.vision_width = vision_width
        self.visual = vision_model
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads)
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.image_projection = nn.Parameter(torch.empty(vision_width, embed_dim))
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        self.fuse_views = fuse_views  # one backbone pass for several views (only meaningful for SLIP)
        self.truncate_text = True  # run each caption only up to its end-of-text token (packed or padded)
        self.pad_text: Optional[bool] = None  # truncated text padded (True) or packed (False); None: padded on an
        # accelerator and under torch.compile (no host sync), packed on the CPU in eager mode (measured faster there)
        self.class_token_only = True  # the ViT's last block computes the class token alone
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = self.transformer.width, self.transformer.layers
        attn_std = width ** -0.5
        proj_std = width ** -0.5 * (2 * layers) ** -0.5
        fc_std = (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.image_projection, std=self.vision_width ** -0.5)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return visual_forward(self.visual, image, self.class_token_only) @ self.image_projection  # [B, E]

    def _padded_text(self, text: torch.Tensor) -> bool:
        """Whether truncated captions run padded (``pad_text``, or by default on an accelerator and under compile)."""
        if self.pad_text is not None:
            return self.pad_text
        return text.device.type != 'cpu' or torch.compiler.is_compiling()

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """[B, L] token ids (L <= 77: the collate trims a training batch to its longest caption, rounded up to
        --text-pad-multiple) -> [B, E]. The end-of-text token has the largest id; its row is the caption's."""
        eot = text.argmax(dim=-1)  # [B]
        L = text.shape[1]
        if not self.truncate_text:  # the original: every caption runs the full (given) context
            x = self.token_embedding(text) + self.positional_embedding[:L]  # [B, L, W]
            x = self.ln_final(self.transformer(x))
            return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection  # [B, E]
        if self._padded_text(text):
            # Padded: [B, L, W] under the causal mask, the last block on each caption's end-of-text token alone
            # (a gather). Shapes depend on L only, known on the host: no device read, one compiled graph per L.
            x = self.token_embedding(text) + self.positional_embedding[:L]  # [B, L, W]
            return self.ln_final(self.transformer(x, rows=eot)) @ self.text_projection  # [B, E]
        # Packed (the CPU's faster path): positions after a caption's end-of-text never reach its embedding under the
        # causal mask, so only each caption's own tokens run, packed into [T, W] (T = total caption length) for every
        # projection and MLP. The longest caption is read on the host (one sync) and ``nonzero`` picks the tokens.
        B, L = text.shape[0], int(eot.max()) + 1
        flat = (torch.arange(L, device=text.device) <= eot[:, None]).flatten().nonzero().squeeze(1)  # [T]
        x = self.token_embedding(text[:, :L].reshape(-1)[flat]) + self.positional_embedding[flat % L]  # [T, W]
        last = (eot + 1).cumsum(0) - 1  # each caption's end-of-text token in the packed rows
        x = self.ln_final(self.transformer(x, (flat, B, L), rows=last))  # [B, W]: the last block runs those rows
        return x @ self.text_projection  # [B, E]

    def towers(self, batch) -> Dict[str, torch.Tensor]:
        """Per-sample outputs of the towers that enter the batch-coupled part (the loss): image and text embeddings."""
        text_embed = self.encode_text(batch.text)  # first: the packed path's host sync waits on little work
        # training only: the CLIP view may keep a share of its patches (--clip-mask-ratio); encode_image never masks
        h = visual_forward(self.visual, batch.image, self.class_token_only, batch.image_keep)
        return {'image_embed': h @ self.image_projection, 'text_embed': text_embed}

    def head(self, features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """What the loss reads, from the towers' outputs of the whole batch."""
        return {**features, 'logit_scale': self.logit_scale.exp()}

    def head_parameters(self) -> List[nn.Parameter]:
        """The parameters ``head`` uses (the training engine runs the head once per accumulated batch)."""
        return [self.logit_scale]

    def forward(self, image, text: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """``model(batch)``, an ``augment.Batch`` with ``image`` and ``text``, or the original's ``model(image, text)``
        -> {'image_embed', 'text_embed', 'logit_scale'}."""
        return self.head(self.towers(as_batch(('image', 'text'), (image, text))))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable
        if hasattr(self.visual, 'set_grad_checkpointing'):
            self.visual.set_grad_checkpointing(enable)


class SIMCLR(nn.Module):
    """Image-only SimCLR. forward(batch) -> {'aug1_embed', 'aug2_embed'}."""

    def __init__(self, vision_width: int, vision_model: nn.Module, ssl_mlp_dim: int, ssl_emb_dim: int,
                 fuse_views: bool = True, ssl_head_norm: str = 'bn'):
        super().__init__()
        self.vision_width = vision_width
        self.visual = vision_model
        self.image_mlp = build_mlp(vision_width, ssl_mlp_dim, ssl_emb_dim, ssl_head_norm)
        self.fuse_views = fuse_views
        self.class_token_only = True  # the ViT's last block computes the class token alone

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return visual_forward(self.visual, image, self.class_token_only)

    def towers(self, batch) -> Dict[str, torch.Tensor]:
        """The two views' backbone features (before the SSL head, whose BatchNorm couples the batch)."""
        h1, h2 = visual_features(self.visual, [batch.aug1, batch.aug2], self.fuse_views, self.class_token_only,
                                  [batch.aug1_keep, batch.aug2_keep])
        return {'aug1_feat': h1, 'aug2_feat': h2}

    def head(self, features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        # The head runs per view: its BatchNorm statistics are per view in the original.
        return {'aug1_embed': self.image_mlp(features['aug1_feat']),
                'aug2_embed': self.image_mlp(features['aug2_feat'])}

    def head_parameters(self) -> List[nn.Parameter]:
        return list(self.image_mlp.parameters())

    def forward(self, aug1, aug2: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """``model(batch)``, an ``augment.Batch`` with ``aug1`` and ``aug2``, or the original's ``model(aug1, aug2)``
        -> {'aug1_embed', 'aug2_embed'}."""
        return self.head(self.towers(as_batch(('aug1', 'aug2'), (aug1, aug2))))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)


class SLIP(CLIP):
    """CLIP plus a SimCLR head on the image backbone. forward(batch) with image, text, aug1 and aug2."""

    def __init__(self, ssl_mlp_dim: int, ssl_emb_dim: int, ssl_head_norm: str = 'bn', **kwargs):
        super().__init__(**kwargs)
        self.image_mlp = build_mlp(self.vision_width, ssl_mlp_dim, ssl_emb_dim, ssl_head_norm)

    def towers(self, batch) -> Dict[str, torch.Tensor]:
        """Image and text embeddings, and the SimCLR views' backbone features (before the SSL head)."""
        text_embed = self.encode_text(batch.text)  # first: the packed path's host sync waits on little work
        h1, h2, h = visual_features(self.visual, [batch.aug1, batch.aug2, batch.image], self.fuse_views,
                                     self.class_token_only, [batch.aug1_keep, batch.aug2_keep, batch.image_keep])
        return {'image_embed': h @ self.image_projection, 'text_embed': text_embed, 'aug1_feat': h1, 'aug2_feat': h2}

    def head(self, features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {'image_embed': features['image_embed'], 'text_embed': features['text_embed'],
                'logit_scale': self.logit_scale.exp(),
                'aug1_embed': self.image_mlp(features['aug1_feat']),
                'aug2_embed': self.image_mlp(features['aug2_feat'])}

    def head_parameters(self) -> List[nn.Parameter]:
        return [self.logit_scale, *self.image_mlp.parameters()]

    def forward(self, image, text: Optional[torch.Tensor] = None, aug1: Optional[torch.Tensor] = None,
                aug2: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """``model(batch)``, an ``augment.Batch`` with all four inputs, or the original's
        ``model(image, text, aug1, aug2)`` -> CLIP's outputs plus 'aug1_embed', 'aug2_embed'."""
        return self.head(self.towers(as_batch(('image', 'text', 'aug1', 'aug2'), (image, text, aug1, aug2))))


# ----------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """What scripts need to know about a model name without building it."""
    name: str
    family: str  # 'clip' | 'simclr' | 'slip'
    image_size: int
    builder: Callable[..., nn.Module]
    ssl_mlp_dim: int = 4096  # default SSL head sizes (the CLI's --ssl-mlp-dim / --ssl-emb-dim when not given)
    ssl_emb_dim: int = 256
    patch_size: Optional[int] = 16  # the ViT's patch (None: no patch tokens, e.g. CLIP_RN50)

    @property
    def has_text(self) -> bool:
        return self.family in ('clip', 'slip')

    @property
    def has_ssl(self) -> bool:
        return self.family in ('simclr', 'slip')


MODELS: Dict[str, ModelSpec] = {}
LEGACY_PREFIXES = utils.LEGACY_PREFIXES  # pre-release name of SLIP stored in early released checkpoints
FAMILY_CLASSES = {'clip': CLIP, 'simclr': SIMCLR, 'slip': SLIP}

# Vision towers: timm model name and overrides (public create_model API), and the feature width.
VIT_S = ('vit_small_patch16_224', dict(num_heads=12), 384)  # MoCo v3 ViT-S: 12 heads instead of timm's 6
VIT_B = ('vit_base_patch16_224', {}, 768)
VIT_L = ('vit_large_patch16_224', {}, 1024)
VIT_TINY = ('vit_base_patch16_224', dict(img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=4), 64)
TEXT_FULL = dict(embed_dim=512, transformer_width=512, transformer_heads=8, transformer_layers=12)
TEXT_TINY = dict(embed_dim=64, transformer_width=64, transformer_heads=4, transformer_layers=2)


def _vit(tower) -> nn.Module:
    name, overrides, _ = tower
    visual = timm.create_model(name, pretrained=False, num_classes=0, **overrides)
    use_split_heads(visual)  # q/k/v heads in the projection's layout: one copy fewer per block's backward
    return visual


# Keywords a caller may pass to a registry builder (the rest is fixed by the architecture). ``rand_embed`` is passed
# by the original eval script and means nothing here: tolerated and dropped.
BUILDER_KWARGS = {'clip': ('context_length', 'vocab_size', 'fuse_views'), 'simclr': ('fuse_views', 'ssl_head_norm'),
                  'slip': ('context_length', 'vocab_size', 'fuse_views', 'ssl_head_norm')}
IGNORED_KWARGS = ('rand_embed',)


def _check_kwargs(name: str, family: str, kwargs: dict) -> dict:
    """Drop the tolerated legacy keywords; raise naming any other keyword the model does not take (a typo)."""
    kwargs = {k: v for k, v in kwargs.items() if k not in IGNORED_KWARGS}
    unknown = sorted(set(kwargs) - set(BUILDER_KWARGS[family]))
    if unknown:
        raise TypeError(f'{name} got unexpected keyword argument(s) {", ".join(unknown)}; it takes ssl_mlp_dim, '
                        f'ssl_emb_dim, {", ".join(BUILDER_KWARGS[family])}')
    return kwargs


def _make(name: str, family: str, tower, text: Optional[dict], ssl_mlp_dim: int, ssl_emb_dim: int,
          **kwargs) -> nn.Module:
    kwargs = _check_kwargs(name, family, kwargs)
    args = dict(vision_width=tower[2], vision_model=_vit(tower))
    if family != 'clip':
        args.update(ssl_mlp_dim=ssl_mlp_dim, ssl_emb_dim=ssl_emb_dim)
    if family != 'simclr':
        args.update(text)
    return FAMILY_CLASSES[family](**args, **kwargs)


def _register(name: str, family: str, tower, text: Optional[dict] = TEXT_FULL, image_size: int = 224,
              ssl_mlp_dim: int = 4096, ssl_emb_dim: int = 256) -> Callable[..., nn.Module]:
    def builder(ssl_mlp_dim: int = ssl_mlp_dim, ssl_emb_dim: int = ssl_emb_dim, **kwargs) -> nn.Module:
        return _make(name, family, tower, text, ssl_mlp_dim, ssl_emb_dim, **kwargs)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = f'{family.upper()} model with a {tower[0]} {tower[1] or ""} image tower at {image_size} px.'
    MODELS[name] = ModelSpec(name, family, image_size, builder, ssl_mlp_dim, ssl_emb_dim,
                             tower[1].get('patch_size', 16))
    return builder


CLIP_VITS16 = _register('CLIP_VITS16', 'clip', VIT_S)
CLIP_VITB16 = _register('CLIP_VITB16', 'clip', VIT_B)
CLIP_VITL16 = _register('CLIP_VITL16', 'clip', VIT_L)
SIMCLR_VITS16 = _register('SIMCLR_VITS16', 'simclr', VIT_S, text=None)
SIMCLR_VITB16 = _register('SIMCLR_VITB16', 'simclr', VIT_B, text=None)
SIMCLR_VITL16 = _register('SIMCLR_VITL16', 'simclr', VIT_L, text=None)
SLIP_VITS16 = _register('SLIP_VITS16', 'slip', VIT_S)
SLIP_VITB16 = _register('SLIP_VITB16', 'slip', VIT_B)
SLIP_VITL16 = _register('SLIP_VITL16', 'slip', VIT_L)
# Tiny models for CPU work and tests: 64 px, patch 8, ViT width 64 / depth 2 / 4 heads, text width 64 / 2 layers,
# embedding 64, SSL head 256 -> 64. Same tokenizer (49,408 ids) and context length 77 as the real models.
CLIP_TINY = _register('CLIP_TINY', 'clip', VIT_TINY, TEXT_TINY, image_size=64, ssl_mlp_dim=256, ssl_emb_dim=64)
SIMCLR_TINY = _register('SIMCLR_TINY', 'simclr', VIT_TINY, None, image_size=64, ssl_mlp_dim=256, ssl_emb_dim=64)
SLIP_TINY = _register('SLIP_TINY', 'slip', VIT_TINY, TEXT_TINY, image_size=64, ssl_mlp_dim=256, ssl_emb_dim=64)

# Legacy checkpoint names resolve to the same constructors.
CLIP_SIMCLR_VITS16, CLIP_SIMCLR_VITB16, CLIP_SIMCLR_VITL16 = SLIP_VITS16, SLIP_VITB16, SLIP_VITL16


def CLIP_RN50(ssl_mlp_dim: int = 4096, ssl_emb_dim: int = 256, **kwargs) -> nn.Module:
    """The seed's improved CLIP baseline: OpenAI's modified ResNet-50 (attention pooling) as the image tower.

    No weights were released for it. The tower is open_clip's ModifiedResNet with RN50's hyper-parameters
    (layers 3-4-6-3, width 64, 32 pooling heads, 1024-d pooled output) followed by our image_projection to 512.
    It has BatchNorm, so it never shares a batch between views.
    """
    from open_clip.modified_resnet import ModifiedResNet  # import here: open_clip is slow to import

    kwargs = _check_kwargs('CLIP_RN50', 'clip', kwargs)
    tower = ModifiedResNet(layers=[3, 4, 6, 3], output_dim=1024, heads=32, image_size=224, width=64)
    return CLIP(vision_width=1024, vision_model=tower, fuse_views=False, **TEXT_FULL, **kwargs)


MODELS['CLIP_RN50'] = ModelSpec('CLIP_RN50', 'clip', 224, CLIP_RN50, patch_size=None)


def resolve_name(name: str) -> str:
    """Map a model name (including the legacy CLIP_SIMCLR_* names) to its registry name."""
    name = utils.current_model_name(name)
    if name not in MODELS:
        raise KeyError(f'unknown model {name!r}; known models: {", ".join(MODELS)}')
    return name


def get_spec(name: str) -> ModelSpec:
    return MODELS[resolve_name(name)]


def create_model(name: str, ssl_mlp_dim: Optional[int] = None, ssl_emb_dim: Optional[int] = None,
                 **kwargs) -> nn.Module:
    """Build a registered model; SSL head sizes default to the model's own (4096/256, tiny 256/64)."""
    spec = get_spec(name)
    return spec.builder(ssl_mlp_dim=ssl_mlp_dim or spec.ssl_mlp_dim, ssl_emb_dim=ssl_emb_dim or spec.ssl_emb_dim,
                        **kwargs)


def create_model_from_args(name: str, args: Dict, **kwargs) -> nn.Module:
    """The model that a run's or a checkpoint's args describe: SSL head sizes and normalisation ('syncbn' is a
    BatchNorm head synchronised at training time; released checkpoints, which do not record it, have BatchNorm)."""
    spec = get_spec(name)
    if spec.has_ssl:
        norm = args.get('ssl_head_norm') or 'bn'
        kwargs['ssl_head_norm'] = 'bn' if norm == 'syncbn' else norm
    return create_model(spec.name, args.get('ssl_mlp_dim'), args.get('ssl_emb_dim'), **kwargs)


def get_loss(model: str, ssl_temp: float = 0.1, ssl_scale: float = 1.0, legacy_clip_gather: bool = False) -> nn.Module:
    """The loss of the model named ``model``, its family read from the registry: the original's
    ``models.get_loss(model, ssl_temp, ssl_scale)``. (A legacy ``CLIP_SIMCLR_*`` name gets SLIP's loss, where the
    original's name-prefix test gave it CLIP's.) ``legacy_clip_gather``: the original CLIP gather (losses.py)."""
    return losses.loss_for_family(get_spec(model).family, ssl_temp, ssl_scale, legacy_clip_gather)


def set_fast_paths(model: nn.Module, enabled: bool) -> None:
    """Switch every exact shortcut on or off: shared view pass, class-token-only last ViT block, packed text, fused
    attention and the ViT attention's split heads (``towers.SplitHeadsAttention``)."""
    for m in model.modules():
        if isinstance(m, (CLIP, SIMCLR)):
            has_batch_stats = any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.visual.modules())
            m.fuse_views = enabled and not has_batch_stats
            m.class_token_only = enabled
        if isinstance(m, CLIP):
            m.truncate_text = enabled
        if isinstance(m, CausalSelfAttention):
            m.fused = enabled
        if hasattr(m, 'fused_attn'):  # timm attention
            m.fused_attn = enabled
        if type(m) is SplitHeadsAttention and not enabled:
            m.__class__ = TimmAttention  # timm's own heads' layout (the same numbers, one more copy)
    if enabled:
        use_split_heads(model)

