"""export_open_clip.py: exported folders load in open_clip with no code of ours and reproduce our embeddings."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval_zeroshot
import export_open_clip as E
import models
import utils

open_clip = pytest.importorskip('open_clip')
TOL = 1e-5  # relative, per embedding


def _save(path, name, released=False, seed=0):
    """A random-weight checkpoint of ``name``: ours (plain dict args) or the released format (module. keys,
    argparse Namespace args, legacy CLIP_SIMCLR_* name)."""
    torch.manual_seed(seed)
    model = models.create_model(name)
    state = {'module.' + k: v for k, v in model.state_dict().items()}
    if released:
        args = argparse.Namespace(model=name.replace('SLIP_', 'CLIP_SIMCLR_'), ssl_mlp_dim=256, ssl_emb_dim=64)
        torch.save({'epoch': 25, 'state_dict': state, 'best_acc1': 1.0, 'args': args}, path)
    else:
        torch.save({'epoch': 1, 'state_dict': state, 'args': {'model': name}}, path)
    return model.eval()


def _inputs(size, batch=2):
    image = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    text = utils.Tokenizer()(['a photo of a red circle.', 'a diagram of a green cross on a white background'][:batch])
    return image, text


def _test_image():
    """Non-square and not RGB, so the resize of the short side, the crop and the conversion all act."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(150, 260), dtype=np.uint8), mode='L')


def _export_and_load(tmp_path, name, released=False):
    ckpt = tmp_path / f'{name}.pt'
    ours = _save(ckpt, name, released)
    folder = tmp_path / f'export_{name}'
    E.export(str(ckpt), str(folder))
    theirs, _, preprocess = open_clip.create_model_and_transforms(f'local-dir:{folder}')
    return ours, theirs.eval(), preprocess, folder


def _assert_same_embeddings(ours, theirs, size):
    err = E.roundtrip_error(ours, theirs, *_inputs(size))
    assert err['image'] < TOL and err['text'] < TOL, err


@pytest.mark.parametrize('name,released', [('CLIP_TINY', False), ('SLIP_TINY', True)])
def test_tiny_export_loads_in_open_clip_with_equal_embeddings_and_preprocess(tmp_path, name, released):
    ours, theirs, preprocess, folder = _export_and_load(tmp_path, name, released)
    _assert_same_embeddings(ours, theirs, 64)
    img = _test_image()
    assert torch.equal(preprocess(img), eval_zeroshot.eval_transform(64)(img))
    assert open_clip.get_tokenizer(f'local-dir:{folder}')(['a red circle']).equal(utils.Tokenizer()(['a red circle']))
    # no pickle anywhere: safetensors weights and JSON config (the tiny tower is a timm local-dir model folder)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob('*') if p.is_file())
    assert files == sorted([E.CONFIG, E.WEIGHTS, 'timm_tower/config.json'])
    cfg = json.loads((folder / E.CONFIG).read_text())
    vision = cfg['model_cfg']['vision_cfg']
    assert vision['timm_pool'] == 'token' and vision['timm_proj'] == 'linear' and vision['timm_proj_bias'] is False
    assert vision['timm_model_name'] == f'local-dir:{folder / "timm_tower"}'
    assert cfg['model_cfg']['quick_gelu'] is True
    assert cfg['preprocess_cfg']['interpolation'] == 'bilinear'
    assert cfg['preprocess_cfg']['mean'] == [0.485, 0.456, 0.406]
    assert cfg['preprocess_cfg']['std'] == [0.229, 0.224, 0.225]
    assert not any(k.startswith('image_mlp') for k in theirs.state_dict())


@pytest.mark.slow
@pytest.mark.parametrize('name', ['CLIP_VITS16', 'CLIP_RN50'])
def test_real_shapes_embeddings_and_preprocess_equal_ours(tmp_path, name):
    ours, theirs, preprocess, folder = _export_and_load(tmp_path, name)
    _assert_same_embeddings(ours, theirs, 224)
    img = _test_image()
    assert torch.equal(preprocess(img), eval_zeroshot.eval_transform(224)(img))
    vision = json.loads((folder / E.CONFIG).read_text())['model_cfg']['vision_cfg']
    if name == 'CLIP_VITS16':  # 12 heads: a timm model folder with that one override
        tower = json.loads((folder / 'timm_tower' / 'config.json').read_text())
        assert tower['architecture'] == 'vit_small_patch16_224' and tower['model_args'] == {'num_heads': 12}
        assert theirs.visual.trunk.blocks[0].attn.num_heads == 12
    else:  # open_clip's own RN50 tower, projected to 512
        assert vision == open_clip.get_model_config('RN50')['vision_cfg']
        assert theirs.visual.attnpool.c_proj.weight.shape == (512, 2048)


@pytest.mark.parametrize('name,timm_name', [('SLIP_VITB16', 'vit_base_patch16_224'),
                                            ('CLIP_VITL16', 'vit_large_patch16_224')])
def test_vit_b_and_l_map_onto_open_clip_keys_and_shapes(tmp_path, name, timm_name):
    """On the meta device: the config names timm's own tower and our converted weights fit open_clip's exactly."""
    with torch.device('meta'):
        ours = models.create_model(name)
    cfg, timm_cfg = E.open_clip_config(ours, 224, str(tmp_path))
    assert timm_cfg is None and cfg['model_cfg']['vision_cfg']['timm_model_name'] == timm_name
    converted = E.to_open_clip_state_dict(ours.state_dict(), resnet=False)
    with torch.device('meta'):
        theirs = open_clip.model.CLIP(**cfg['model_cfg'])
    shapes = lambda sd: {k: tuple(v.shape) for k, v in sd.items()}  # noqa: E731
    assert shapes(converted) == shapes(theirs.state_dict())
    assert converted['visual.head.proj.weight'].shape == ours.image_projection.T.shape


def test_simclr_checkpoint_is_refused_with_a_clear_message(tmp_path):
    ckpt = tmp_path / 'simclr.pt'
    _save(ckpt, 'SIMCLR_TINY')
    with pytest.raises(ValueError, match='SIMCLR_TINY, a SimCLR model without a text tower'):
        E.export(str(ckpt), str(tmp_path / 'out'))
    assert not (tmp_path / 'out' / E.WEIGHTS).exists()


def test_checkpoint_without_args_needs_model_name(tmp_path):
    ckpt = tmp_path / 'bare.pt'
    torch.save(models.create_model('CLIP_TINY').state_dict(), ckpt)
    with pytest.raises(utils.CheckpointError, match='no args.model: pass --model'):
        E.export(str(ckpt), str(tmp_path / 'a'))
    E.export(str(ckpt), str(tmp_path / 'b'), model_name='CLIP_TINY')
    assert (tmp_path / 'b' / E.WEIGHTS).is_file()


def test_clip_benchmark_prompt_files_give_our_classifier(tmp_path):
    _, labels, templates = eval_zeroshot.load_assets()
    E.main(argparse.Namespace(checkpoint='', output_dir=str(tmp_path), model=None, check=False,
                              labels=os.path.join(E.HERE, 'labels.json'),
                              templates=os.path.join(E.HERE, 'templates.json')))
    classnames = json.loads((tmp_path / E.CB_CLASSNAMES).read_text())
    prompts = json.loads((tmp_path / E.CB_TEMPLATES).read_text())
    assert len(prompts['imagenet']) == 7 and prompts['imagenet1k'] == prompts['imagenet']
    assert classnames['imagenet1k'] == labels['imagenet']
    assert [t.format(c='dog') for t in prompts['imagenet']] == [t.format('dog') for t in templates['imagenet']]
    assert prompts['imagenet_80'][0].format(c='dog') == templates['imagenet_80'][0].format('dog')
    assert classnames['fer2013'][3] == 'happy' and isinstance(prompts['fer2013'], dict)
    assert len(prompts['fer2013']['happy']) == len(templates['fer2013']) * 2  # every template x synonym
    # CLIP_benchmark's classifier (normalise each prompt, average per class, normalise) equals ours on fer2013 and demo
    model, tok = models.create_model('CLIP_TINY').eval(), utils.Tokenizer()
    for name in ('fer2013', 'demo'):
        rows = []
        for c in classnames[name]:
            texts = prompts[name][c] if isinstance(prompts[name], dict) else [t.format(c=c) for t in prompts[name]]
            with torch.no_grad():
                rows.append(F.normalize(F.normalize(model.encode_text(tok(texts)), dim=-1).mean(0), dim=0))
        ref = eval_zeroshot.build_classifier(model, tok, labels[name], templates[name], 'cpu')
        assert torch.allclose(torch.stack(rows), ref, atol=1e-6), name


def test_load_clip_benchmark_returns_model_transform_tokenizer(tmp_path):
    ckpt = tmp_path / 'clip.pt'
    _save(ckpt, 'CLIP_TINY')
    E.export(str(ckpt), str(tmp_path / 'exp'))
    img = _test_image()
    outputs = []
    for source in (str(tmp_path / 'exp'), str(ckpt)):  # the exported folder (open_clip) and the checkpoint (ours)
        model, transform, tokenizer = E.load_clip_benchmark(source, pretrained=None, cache_dir=None, device='cpu')
        with torch.no_grad():
            outputs.append((model.encode_image(transform(img)[None]),
                            model.encode_text(tokenizer(['a cat']).to('cpu'))))
    for a, b in zip(*outputs):
        assert a.shape == (1, 64) and torch.allclose(a, b, rtol=TOL, atol=1e-6)
