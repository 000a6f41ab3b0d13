"""Fine-tuning models: timm ViTs with the SLIP image-tower key names, pre-trained weight loading, layer-wise lr decay.

The seed fine-tuned with BEiT's own ViT, patched so its keys match timm's. Here the model *is* timm's
``VisionTransformer``, configured like the seed's ``beit_*`` models with ``--disable_rel_pos_bias --abs_pos_emb``:
pre-norm blocks with a fused, biased qkv, LayerNorm eps 1e-6, a learned absolute position embedding and optional
layer scale. Its keys (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.N.*``, ``norm``) are the
``visual.*`` keys of every SLIP, CLIP and SimCLR checkpoint, so the backbone loads without renaming.

References:
  BEiT: Bao et al., "BEiT: BERT Pre-Training of Image Transformers", arXiv 2106.08254 (fine-tuning recipe,
  layer-wise learning-rate decay).
"""
from typing import Any, Dict, List, Tuple

import torch
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import VisionTransformer

import utils
import zoo

# name -> ViT geometry. small is the MoCo v3 / SLIP ViT-S (12 heads, not timm's 6); the tiny one matches the image
# tower of models.SLIP_TINY / CLIP_TINY / SIMCLR_TINY and exists for tests and CPU debugging.
FINETUNE_MODELS: Dict[str, Dict[str, int]] = {
    'beit_small_patch16_224': dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=12),
    'beit_base_patch16_224': dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    'beit_large_patch16_224': dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    'beit_tiny_test': dict(img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=4),
}


def create_finetune_model(name: str, num_classes: int, input_size: int = 224, use_cls: bool = True,
                          rel_pos_bias: bool = False, abs_pos_emb: bool = True, layer_scale_init_value: float = 0.0,
                          drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                          init_scale: float = 0.001) -> VisionTransformer:
    """Build a classification ViT for fine-tuning.

    Args:
        name: one of ``FINETUNE_MODELS``.
        num_classes: size of the new linear head.
        input_size: image side in pixels (the position embedding is sized for it).
        use_cls: pool the class token (the SLIP recipes); otherwise mean-pool the patch tokens through ``fc_norm``.
        rel_pos_bias, abs_pos_emb: BEiT's position options; only absolute embeddings without relative bias exist.
        layer_scale_init_value: initial LayerScale gamma; 0 disables layer scale (the SLIP recipes).
        drop_rate, attn_drop_rate, drop_path_rate: dropout on the head input, on attention, and stochastic depth.
        init_scale: the head's trunc-normal(.02) weights and zero bias are multiplied by this (BEiT's init).

    Raises:
        ValueError: unknown name, or a position-embedding combination other than absolute-only.
    """
    if name not in FINETUNE_MODELS:
        raise ValueError(f'--model {name!r} is unknown; choose one of {", ".join(FINETUNE_MODELS)}')
    if rel_pos_bias or not abs_pos_emb:
        raise ValueError('only absolute position embeddings are supported (the layout of SLIP checkpoints): pass '
                         '--disable_rel_pos_bias --abs_pos_emb; BEiT relative position bias is not implemented')
    geometry = dict(FINETUNE_MODELS[name], img_size=input_size)
    model = VisionTransformer(
        **geometry, num_classes=num_classes, mlp_ratio=4.0, qkv_bias=True,
        init_values=layer_scale_init_value if layer_scale_init_value > 0 else None,
        global_pool='token' if use_cls else 'avg',  # avg: mean of patch tokens then fc_norm (final norm off), as BEiT
        drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate)
    with torch.no_grad():
        trunc_normal_(model.head.weight, std=0.02)
        model.head.weight.mul_(init_scale)
        model.head.bias.zero_()
    return model


# ----------------------------------------------------------------------------------------------------------------
# Pre-trained weights
# ----------------------------------------------------------------------------------------------------------------
def _select_state_dict(ckpt: Dict[str, Any], model_key: str, path: str) -> Dict[str, torch.Tensor]:
    """The first of the '|'-separated model_key entries present in the checkpoint (else its state_dict)."""
    for key in model_key.split('|'):
        if key and isinstance(ckpt.get(key), dict):
            utils.logger.info('load state_dict by model_key = %s', key)
            return utils.strip_prefix(ckpt[key])
    utils.logger.info('%s has none of the model keys %r: using its "state_dict"', path, model_key)
    return ckpt['state_dict']


def _strip_model_prefix(state_dict: Dict[str, torch.Tensor], prefix: str, path: str) -> Dict[str, torch.Tensor]:
    """Keep the entries under ``prefix`` with the prefix removed.

    utils.load_checkpoint already dropped the DDP ``module.``, so ``module.visual.`` means ``visual.`` there; a file
    written without DDP never had it. Both spellings are tried, longest first.
    """
    if not prefix:
        return dict(state_dict)
    candidates = [prefix] + ([prefix[len('module.'):]] if prefix.startswith('module.') else [])
    for p in candidates:
        sub = {k[len(p):]: v for k, v in state_dict.items() if k.startswith(p)}
        if sub:
            return sub
    raise utils.CheckpointError(f'checkpoint {path!r} has no keys under --model_prefix {prefix!r} (tried '
                                f'{candidates}); its first keys are {list(state_dict)[:5]}')


def _resize_pos_embed(model: VisionTransformer, state_dict: Dict[str, torch.Tensor]) -> None:
    """Interpolate a checkpoint's position grid to the model's (e.g. 224 px weights fine-tuned at 384 px)."""
    pos = state_dict.get('pos_embed')
    if pos is None or pos.shape == model.pos_embed.shape:
        return
    prefix = model.num_prefix_tokens
    old = int(round((pos.shape[1] - prefix) ** 0.5))
    new = model.patch_embed.grid_size
    utils.logger.info('interpolating pos_embed from %dx%d to %dx%d', old, old, new[0], new[1])
    state_dict['pos_embed'] = resample_abs_pos_embed(pos, list(new), [old, old], num_prefix_tokens=prefix)


def load_pretrained(model: VisionTransformer, path: str, model_key: str = 'model|module',
                    model_prefix: str = '') -> Tuple[List[str], List[str]]:
    """Load a SLIP / CLIP / SimCLR (or earlier fine-tuning) checkpoint into the backbone; the head stays new.

    Args:
        model: the fine-tuning model.
        path: checkpoint file, a released name or a URL, read through zoo.load_checkpoint (safe, ``module.`` stripped).
        model_key: '|'-separated candidate entries holding the weights (falls back to ``state_dict``).
        model_prefix: key prefix of the image tower, e.g. ``module.visual.`` for pre-training checkpoints.

    Returns:
        (missing, unexpected) key lists, also logged.

    Raises:
        utils.CheckpointError: unreadable file, nothing under the prefix, or a tensor of the wrong shape.
    """
    ckpt = zoo.load_checkpoint(path)
    state_dict = _strip_model_prefix(_select_state_dict(ckpt, model_key, path), model_prefix, path)
    own = model.state_dict()
    for k in ('head.weight', 'head.bias'):  # a classifier for another label set is dropped, as in BEiT
        if k in state_dict and state_dict[k].shape != own[k].shape:
            utils.logger.info('dropping %s %s from the checkpoint (model has %s)', k, tuple(state_dict[k].shape),
                              tuple(own[k].shape))
            del state_dict[k]
    _resize_pos_embed(model, state_dict)
    result = utils.load_state_dict_checked(model, state_dict, path, strict=False)
    utils.logger.info('loaded %d tensors from %s; missing: %s; unexpected: %s', len(state_dict) -
                      len(result.unexpected_keys), path, result.missing_keys, result.unexpected_keys)
    return list(result.missing_keys), list(result.unexpected_keys)


# ----------------------------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay (BEiT)
# ----------------------------------------------------------------------------------------------------------------
def get_layer_id(name: str, depth: int) -> int:
    """0 for the embeddings (cls token, position, patch), i+1 for block i, depth+1 for everything after the blocks."""
    if name in ('cls_token', 'pos_embed', 'mask_token') or name.startswith('patch_embed'):
        return 0
    if name.startswith('blocks.'):
        return int(name.split('.')[1]) + 1
    return depth + 1


def param_groups_layer_decay(model: VisionTransformer, weight_decay: float, layer_decay: float) -> List[dict]:
    """Optimizer groups with BEiT's per-layer ``lr_scale`` = layer_decay ** (depth + 1 - layer_id).

    Biases, 1-d tensors (norms, layer scale) and the model's no-weight-decay tensors (cls token, position
    embedding) get no weight decay. A layer_decay >= 1 gives every group scale 1, as BEiT does.

    timm's own ``param_groups_layer_decay`` numbers layers from the parameters it finds, so with mean pooling
    (final norm replaced by an identity) the head would share the last block's scale; BEiT always counts
    depth + 2 layers, which is what this does.
    """
    depth = len(model.blocks)
    skip = set(model.no_weight_decay())
    groups: Dict[Tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = get_layer_id(name, depth)
        decay = not (param.ndim <= 1 or name.endswith('.bias') or name in skip)
        scale = layer_decay ** (depth + 1 - layer) if layer_decay < 1.0 else 1.0
        group = groups.setdefault((layer, decay), {
            'params': [], 'param_names': [], 'layer_id': layer, 'lr_scale': scale,
            'weight_decay': weight_decay if decay else 0.0})
        group['params'].append(param)
        group['param_names'].append(name)
    return [groups[k] for k in sorted(groups)]
