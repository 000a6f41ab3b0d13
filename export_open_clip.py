"""Export a CLIP or SLIP checkpoint as an open_clip model folder, which open_clip and CLIP_benchmark load unchanged.

Commands:
    python export_open_clip.py --checkpoint slip_base_100ep --output-dir export/slip_base_100ep     # a released name
    python export_open_clip.py --checkpoint out/demo/checkpoint_best.pt --output-dir export/demo --check
    python export_open_clip.py --output-dir export/prompts        # only the CLIP_benchmark prompt files
Then, with no code of this repository:
    open_clip.create_model_and_transforms('local-dir:export/slip_base_100ep')
    clip_benchmark eval --model_type open_clip --model local-dir:export/slip_base_100ep --pretrained none \
        --dataset wds/NAME --dataset_root DATA --no_amp \
        --custom_classname_file export/slip_base_100ep/clip_benchmark_classnames.json \
        --custom_template_file export/slip_base_100ep/clip_benchmark_templates.json    (README: the tested command)

The folder holds ``open_clip_config.json`` (``model_cfg`` and ``preprocess_cfg``), ``open_clip_model.safetensors``
(no pickle) and the two CLIP_benchmark prompt files (labels.json / templates.json in its format: ``{c}`` templates,
SLIP's synonym lists as per-class prompt lists). ``--checkpoint`` takes a path, a released name or a URL (zoo.py).

How our weights map onto open_clip 3.3:
  * ViT towers become a timm tower (``timm_model_name``, ``timm_pool: token`` = the class token, ``timm_proj:
    linear`` without bias holding ``image_projection`` transposed; ``visual.*`` -> ``visual.trunk.*``), so the
    tower is timm's own code with its GELU and LayerNorm eps 1e-6. ViT-B/L are timm's registered names. ViT-S (12
    heads, timm's has 6) and the tiny test towers have no timm name and open_clip 3.3 passes no model arguments to
    timm, so they are written as a timm model folder ``timm_tower/config.json`` (architecture + model_args) and named
    by timm's ``local-dir:`` model source with its absolute path: after moving the export folder, export again.
  * ``CLIP_RN50`` uses open_clip's own ``RN50`` config with ``embed_dim`` 512: our ``image_projection`` (1024 -> 512)
    is folded into the attention pool's output projection ``visual.attnpool.c_proj`` (exact up to rounding).
  * The text tower is open_clip's OpenAI layout with ``quick_gelu: true``; its keys are already ours. ``image_mlp.*``
    (the SimCLR head) is dropped; SimCLR checkpoints have no text tower and are refused.
  * Preprocessing is SLIP's evaluation transform: bilinear resize of the short side, centre crop, ImageNet mean/std.
"""
import argparse
import json
import os
import warnings
from typing import Any, Dict, Optional, Tuple

import torch

import checkpoints
import models
import utils
import zeroshot
import zoo
from augment import IMAGENET_MEAN, IMAGENET_STD

HERE = os.path.dirname(os.path.abspath(__file__))
NO_TEXT_TOWER = ('a SimCLR model without a text tower: open_clip and CLIP_benchmark need a CLIP or SLIP checkpoint '
                 '(probe SimCLR with main_linear.py)')
WEIGHTS, CONFIG, TIMM_DIR = 'open_clip_model.safetensors', 'open_clip_config.json', 'timm_tower'
CB_CLASSNAMES, CB_TEMPLATES = 'clip_benchmark_classnames.json', 'clip_benchmark_templates.json'
CB_ALIASES = {'imagenet': 'imagenet1k'}  # our dataset name -> CLIP_benchmark's, where both order classes alike
VIT_FIELDS = {  # timm VisionTransformer arguments that our towers override, read back from a built tower
    'img_size': lambda v: v.patch_embed.img_size[0], 'patch_size': lambda v: v.patch_embed.patch_size[0],
    'embed_dim': lambda v: v.embed_dim, 'depth': lambda v: len(v.blocks),
    'num_heads': lambda v: v.blocks[0].attn.num_heads}


def get_args_parser():
    parser = argparse.ArgumentParser('Export a SLIP/CLIP checkpoint to an open_clip folder', add_help=False)
    parser.add_argument('--checkpoint', default='', help='a path, a released name (slip_base_100ep, ...) or a URL; '
                                                         'empty: write only the CLIP_benchmark prompt files')
    parser.add_argument('--output-dir', required=True, help='folder to write (created)')
    parser.add_argument('--model', default=None, help='architecture, for checkpoints that store no args.model')
    parser.add_argument('--labels', default=os.path.join(HERE, 'labels.json'))
    parser.add_argument('--templates', default=os.path.join(HERE, 'templates.json'))
    parser.add_argument('--check', action='store_true',
                        help='load the folder with open_clip and print its embeddings\' error against ours')
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Configuration and weights
# ----------------------------------------------------------------------------------------------------------------
def timm_tower(visual) -> Tuple[str, Dict[str, Any]]:
    """(timm architecture, the arguments that differ from its defaults) of one of our timm ViT towers."""
    import timm
    arch = visual.pretrained_cfg['architecture']
    with torch.device('meta'):
        ref = timm.create_model(arch, pretrained=False, num_classes=0)
        overrides = {k: f(visual) for k, f in VIT_FIELDS.items() if f(visual) != f(ref)}
        rebuilt = timm.create_model(arch, pretrained=False, num_classes=0, **overrides)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    if shapes(rebuilt) != shapes(visual) or visual.global_pool != 'token':
        raise ValueError(f'image tower ({arch} with {overrides}, pool {visual.global_pool!r}) is not expressible as a '
                         f'timm model for open_clip')
    return arch, overrides


def open_clip_config(model, image_size: int, out_dir: str) -> Tuple[Dict, Optional[Dict]]:
    """({'model_cfg', 'preprocess_cfg'}, the timm_tower/config.json content or None) for one of our CLIP models."""
    from timm.models.vision_transformer import VisionTransformer
    text = model.transformer
    text_cfg = {'context_length': model.context_length, 'vocab_size': model.vocab_size, 'width': text.width,
                'heads': text.resblocks[0].attn.heads, 'layers': text.layers}
    embed_dim, timm_cfg = int(model.text_projection.shape[1]), None
    if isinstance(model.visual, VisionTransformer):
        arch, overrides = timm_tower(model.visual)
        name = arch
        if overrides:
            timm_cfg = {'architecture': arch, 'num_classes': 0, 'model_args': overrides,
                        'pretrained_cfg': {'input_size': [3, image_size, image_size]}}
            name = 'local-dir:' + os.path.abspath(os.path.join(out_dir, TIMM_DIR))
        vision_cfg = {'timm_model_name': name, 'timm_model_pretrained': False, 'timm_pool': 'token',
                      'timm_proj': 'linear', 'timm_proj_bias': False, 'image_size': image_size}
    else:  # OpenAI's modified ResNet (CLIP_RN50): open_clip's own RN50 config, projected to our embedding size
        import open_clip
        rn50 = open_clip.get_model_config('RN50')
        vision_cfg = dict(rn50['vision_cfg'])
        if text_cfg != {k: rn50['text_cfg'].get(k) for k in text_cfg} or \
                tuple(model.visual.attnpool.c_proj.weight.shape) != (1024, 2048):
            raise ValueError("the ResNet tower or text tower does not match open_clip's RN50 config")
    model_cfg = {'embed_dim': embed_dim, 'quick_gelu': True, 'vision_cfg': vision_cfg, 'text_cfg': text_cfg}
    preprocess_cfg = {'size': image_size, 'mode': 'RGB', 'mean': list(IMAGENET_MEAN), 'std': list(IMAGENET_STD),
                      'interpolation': 'bilinear', 'resize_mode': 'shortest', 'fill_color': 0}
    return {'model_cfg': model_cfg, 'preprocess_cfg': preprocess_cfg}, timm_cfg


def to_open_clip_state_dict(state_dict: Dict[str, torch.Tensor], resnet: bool) -> Dict[str, torch.Tensor]:
    """Our CLIP/SLIP keys (no ``module.``) -> open_clip's; the SimCLR head is dropped."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith('image_mlp.') or k == 'image_projection':
            continue
        out['visual.trunk.' + k[len('visual.'):] if k.startswith('visual.') and not resnet else k] = v
    proj = state_dict['image_projection']  # [vision width, embed]
    if resnet:  # fold: (W z + b) P = (P^T W) z + P^T b, computed in float64
        w, b = state_dict['visual.attnpool.c_proj.weight'], state_dict['visual.attnpool.c_proj.bias']
        p = proj.double()
        out['visual.attnpool.c_proj.weight'] = (p.T @ w.double()).to(w.dtype)
        out['visual.attnpool.c_proj.bias'] = (b.double() @ p).to(b.dtype)
    else:
        out['visual.head.proj.weight'] = proj.T
    return {k: v.detach().contiguous() for k, v in out.items()}


def build_model(ckpt: Dict, path: str, name: Optional[str] = None, device: Any = 'meta'):
    """Our model for a loaded checkpoint (on the meta device unless asked), checked strictly against its weights."""
    spec = zeroshot.text_model_spec(ckpt, path, name, no_text=NO_TEXT_TOWER, no_name=': pass --model NAME')
    with torch.device(device):
        model = models.create_model_from_args(spec.name, ckpt['args'])
    with warnings.catch_warnings():  # loading into meta tensors is a (warned) no-op: only the check matters there
        warnings.simplefilter('ignore')
        utils.load_state_dict_checked(model, ckpt['state_dict'], path, strict=True)
    return model.eval(), spec


def _write_json(path: str, data: Any) -> None:
    with checkpoints.atomic_write(path, text=True) as f:
        json.dump(data, f, indent=2)


def export(checkpoint: str, output_dir: str, model_name: Optional[str] = None) -> Tuple[str, Any]:
    """Write the open_clip folder for ``checkpoint``; returns (the folder, our model on the meta device)."""
    from safetensors.torch import save_file
    ckpt = zoo.load_checkpoint(checkpoint)
    model, spec = build_model(ckpt, checkpoint, model_name)
    os.makedirs(output_dir, exist_ok=True)
    config, timm_cfg = open_clip_config(model, spec.image_size, output_dir)
    if timm_cfg is not None:
        os.makedirs(os.path.join(output_dir, TIMM_DIR), exist_ok=True)
        _write_json(os.path.join(output_dir, TIMM_DIR, 'config.json'), timm_cfg)
    resnet = 'timm_model_name' not in config['model_cfg']['vision_cfg']
    weights = to_open_clip_state_dict(ckpt['state_dict'], resnet)
    with checkpoints.atomic_write(os.path.join(output_dir, WEIGHTS)) as f:  # safetensors writes the path itself
        save_file(weights, f.name,
                  metadata={'format': 'pt', 'source': os.path.basename(str(checkpoint)), 'model': spec.name})
    _write_json(os.path.join(output_dir, CONFIG), config)
    utils.logger.info('exported %s (%s) to %s', checkpoint, spec.name, output_dir)
    return output_dir, model


# ----------------------------------------------------------------------------------------------------------------
# CLIP_benchmark: prompt files and a Python loader
# ----------------------------------------------------------------------------------------------------------------
def _cb_template(template: str) -> str:
    """SLIP's ``{}`` placeholder -> CLIP_benchmark's ``{c}`` (other braces escaped for str.format)."""
    return template.replace('{', '{{').replace('}', '}}').replace('{{}}', '{c}')


def clip_benchmark_prompts(labels: Dict, templates: Dict) -> Tuple[Dict, Dict]:
    """(classnames, templates) JSON for ``--custom_classname_file`` / ``--custom_template_file``, keyed by dataset.

    Plain class names get ``{c}`` templates. A dataset with synonym lists (fer2013) gets CLIP_benchmark's per-class
    form {class: prompts}, every template x synonym, so its average is the classifier of eval_zeroshot.py.
    """
    classnames, prompts = {}, {}
    for name, tmpl in templates.items():
        classes = labels.get(name)
        if classes is None or all(isinstance(c, str) for c in classes):
            prompts[name] = [_cb_template(t) for t in tmpl]
            if classes is not None:
                classnames[name] = list(classes)
            continue
        keys = []
        for c in classes:  # one key per class, made unique (they only label the prompt lists)
            key = c if isinstance(c, str) else c[0]
            keys.append(key if key not in keys else f'{key} ({len(keys)})')
        classnames[name] = keys
        prompts[name] = {k: [t.format(s) for t in tmpl for s in ([c] if isinstance(c, str) else c)]
                         for k, c in zip(keys, classes)}
    for ours, theirs in CB_ALIASES.items():
        for table in (classnames, prompts):
            if ours in table:
                table[theirs] = table[ours]
    return classnames, prompts


def write_prompt_files(output_dir: str, labels_path: str, templates_path: str) -> None:
    _, labels, templates = zeroshot.load_assets(None, labels_path, templates_path)
    classnames, prompts = clip_benchmark_prompts(labels, templates)
    os.makedirs(output_dir, exist_ok=True)
    _write_json(os.path.join(output_dir, CB_CLASSNAMES), classnames)
    _write_json(os.path.join(output_dir, CB_TEMPLATES), prompts)


def load_clip_benchmark(model_name: str, pretrained: Optional[str] = None, cache_dir: Optional[str] = None,
                        device: Any = 'cpu'):
    """CLIP_benchmark's loader contract -> (model, transform, tokenizer); ``model`` has encode_image / encode_text.

    ``model_name``: an exported folder (read by open_clip alone), or a checkpoint path, released name or URL (read
    with our models). ``pretrained`` and ``cache_dir`` are CLIP_benchmark's arguments and are not needed.
    """
    if os.path.isfile(os.path.join(model_name, CONFIG)):
        import open_clip
        model, _, transform = open_clip.create_model_and_transforms(f'local-dir:{model_name}', device=device)
        return model.eval(), transform, open_clip.get_tokenizer(f'local-dir:{model_name}')
    model, _ = zeroshot.load_model(model_name, device)
    return model, zeroshot.eval_transform(zeroshot.model_image_size(model)), utils.Tokenizer()


def roundtrip_error(ours, theirs, image: torch.Tensor, text: torch.Tensor) -> Dict[str, float]:
    """Largest per-row relative L2 error of open_clip's image / text embeddings against ours on the same inputs."""
    with torch.no_grad():
        pairs = {'image': (ours.encode_image(image), theirs.encode_image(image)),
                 'text': (ours.encode_text(text), theirs.encode_text(text))}
    return {k: float(((b.double() - a.double()).norm(dim=-1) / a.double().norm(dim=-1)).max()) for k, (a, b) in
            pairs.items()}


def check(checkpoint: str, output_dir: str, model_name: Optional[str] = None, batch: int = 2) -> Dict[str, float]:
    """Load the exported folder with open_clip and compare it with our model on random images and real captions."""
    import open_clip
    ckpt = zoo.load_checkpoint(checkpoint)
    ours, spec = build_model(ckpt, checkpoint, model_name, device='cpu')
    theirs = open_clip.create_model(f'local-dir:{output_dir}').eval()
    image = torch.randn(batch, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(0))
    text = utils.Tokenizer()(['a photo of a dog.', 'a diagram of a SLIP model, drawn on a whiteboard'][:batch])
    return roundtrip_error(ours, theirs, image, text)


def main(args) -> None:
    write_prompt_files(args.output_dir, args.labels, args.templates)
    if not args.checkpoint:
        utils.logger.info('wrote %s and %s to %s', CB_CLASSNAMES, CB_TEMPLATES, args.output_dir)
        return
    export(args.checkpoint, args.output_dir, args.model)
    if args.check:
        err = check(args.checkpoint, args.output_dir, args.model)
        utils.logger.info('open_clip vs ours, max relative error: image %.2e, text %.2e', err['image'], err['text'])


if __name__ == '__main__':
    utils.setup_logging()
    main(argparse.ArgumentParser('export_open_clip', parents=[get_args_parser()]).parse_args())
