"""Registry, checkpoint-compatible layouts, forward/backward of the tiny models, and the exact compute shortcuts."""
import json
import os

import pytest
import torch

import models
import utils

# Parameter names, shapes and counts of the nine released architectures (taken from the original code).
REFERENCE = os.path.join(os.path.dirname(__file__), 'data', 'slip_state_dict_keys.json')
TINY = ['CLIP_TINY', 'SIMCLR_TINY', 'SLIP_TINY']


def _reference():
    with open(REFERENCE) as f:
        return json.load(f)['models']


@pytest.mark.parametrize('name', list(_reference()))
def test_released_layout_matches_reference(name):
    ref = _reference()[name]
    with torch.device('meta'):
        model = getattr(models, name)(ssl_mlp_dim=4096, ssl_emb_dim=256)
    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert got == [(k, v) for k, v in ref['state_dict'].items()]  # names, shapes and order
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == ref['parameters']


def test_registry_records_family_and_resolution():
    assert models.get_spec('SLIP_VITB16').family == 'slip'
    assert models.get_spec('CLIP_VITL16').family == 'clip'
    assert models.get_spec('SIMCLR_VITS16').family == 'simclr'
    assert models.get_spec('SLIP_TINY').image_size == 64
    assert models.get_spec('CLIP_VITS16').image_size == 224
    # ViT-S is the MoCo v3 variant with 12 heads
    with torch.device('meta'):
        vit_s = models.CLIP_VITS16()
    assert all(block.attn.num_heads == 12 for block in vit_s.visual.blocks)


def test_legacy_names_resolve():
    assert models.resolve_name('CLIP_SIMCLR_VITB16') == 'SLIP_VITB16'
    assert models.CLIP_SIMCLR_VITL16 is models.SLIP_VITL16
    assert models.get_spec('CLIP_SIMCLR_VITS16').family == 'slip'
    with pytest.raises(KeyError, match='unknown model'):
        models.resolve_name('CLIP_VITZ99')


def test_rn50_builds_with_attention_pooling():
    with torch.device('meta'):
        model = models.create_model('CLIP_RN50')
    assert models.get_spec('CLIP_RN50').family == 'clip'
    assert type(model.visual).__name__ == 'ModifiedResNet'
    assert hasattr(model.visual, 'attnpool')
    assert tuple(model.image_projection.shape) == (1024, 512)
    assert model.fuse_views is False  # BatchNorm in the tower: views never share a batch


def _inputs(name, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = models.get_spec(name).image_size
    image, aug1, aug2 = (torch.randn(batch, 3, size, size, generator=g) for _ in range(3))
    tok = utils.Tokenizer()
    text = tok(['a dog', 'a red circle on a grey background', 'hello', 'x y z w v'][:batch])
    return {'clip': (image, text), 'simclr': (aug1, aug2), 'slip': (image, text, aug1, aug2)}[
        models.get_spec(name).family]


@pytest.mark.parametrize('name', TINY)
def test_tiny_forward_backward_every_parameter_gets_gradient(name):
    import losses
    torch.manual_seed(0)
    model = models.create_model(name)
    out = model(*_inputs(name))
    expected = {'clip': {'image_embed', 'text_embed', 'logit_scale'}, 'simclr': {'aug1_embed', 'aug2_embed'},
                'slip': {'image_embed', 'text_embed', 'logit_scale', 'aug1_embed', 'aug2_embed'}}
    assert set(out) == expected[models.get_spec(name).family]
    if 'logit_scale' in out:
        assert torch.allclose(out['logit_scale'], torch.tensor(1 / 0.07))  # exponentiated
    loss = losses.get_loss(name)(out)['loss']
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


@pytest.mark.parametrize('name', ['SIMCLR_TINY', 'SLIP_TINY'])
def test_shared_view_pass_equals_separate_passes(name):
    """One concatenated ViT pass gives the outputs, BN statistics and gradients of separate passes.

    In float64, so that only a real difference (not float32 summation order) can fail the comparison.
    """
    torch.manual_seed(0)
    fast = models.create_model(name).double()
    slow = models.create_model(name).double()
    slow.load_state_dict(fast.state_dict())
    models.set_fast_paths(slow, False)
    inputs = [x.double() if x.is_floating_point() else x for x in _inputs(name)]
    out_fast, out_slow = fast(*inputs), slow(*inputs)
    for k in out_fast:
        torch.testing.assert_close(out_fast[k], out_slow[k], atol=1e-10, rtol=1e-10)
    import losses
    losses.get_loss(name)(out_fast)['loss'].backward()
    losses.get_loss(name)(out_slow)['loss'].backward()
    for (n, a), (_, b) in zip(fast.named_parameters(), slow.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-10, msg=n)
    for (n, a), (_, b) in zip(fast.named_buffers(), slow.named_buffers()):
        torch.testing.assert_close(a, b, msg=n)  # BatchNorm running stats updated identically


def test_text_truncation_equals_full_context():
    torch.manual_seed(0)
    model = models.create_model('CLIP_TINY')
    tok = utils.Tokenizer()
    text = tok(['a', 'a much longer caption with quite a few more words in it than the first', 'b c'])
    assert int(text.argmax(-1).max()) < 40  # the shortcut really drops positions here
    model.truncate_text = True
    short = model.encode_text(text)
    model.truncate_text = False
    full = model.encode_text(text)
    torch.testing.assert_close(short, full, atol=1e-5, rtol=1e-5)
    # over-long captions keep their end-of-text token, so they do not collapse to one embedding
    long = tok(['dog ' * 100, 'cat ' * 100])
    emb = model.encode_text(long)
    assert not torch.allclose(emb[0], emb[1])


def test_unfused_attention_equals_fused():
    torch.manual_seed(0)
    model = models.create_model('SLIP_TINY').eval()
    inputs = _inputs('SLIP_TINY')
    with torch.no_grad():
        fused = model(*inputs)
        for m in model.modules():
            if isinstance(m, models.CausalSelfAttention):
                m.fused = False
            if hasattr(m, 'fused_attn'):
                m.fused_attn = False
        plain = model(*inputs)
    for k in fused:
        torch.testing.assert_close(fused[k], plain[k], atol=1e-5, rtol=1e-5)


def test_sync_batchnorm_conversion_keeps_keys():
    model = models.create_model('SLIP_TINY')
    keys = list(model.state_dict())
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(synced.image_mlp.bn1, torch.nn.SyncBatchNorm)
    assert list(synced.state_dict()) == keys


def test_released_format_checkpoint_loads_strict(tmp_path):
    """module.-prefixed keys and a Namespace with a PosixPath, as submitit-launched SLIP runs saved them."""
    import argparse
    import pathlib
    model = models.create_model('SLIP_TINY')
    args = argparse.Namespace(model='CLIP_SIMCLR_TINY', ssl_mlp_dim=256, ssl_emb_dim=64,
                              output_dir=pathlib.PosixPath('/checkpoint/x/123'))
    path = tmp_path / 'released.pt'
    torch.save({'epoch': 25, 'state_dict': {'module.' + k: v for k, v in model.state_dict().items()},
                'optimizer': {}, 'scaler': {}, 'best_acc1': 42.8, 'args': args}, path)
    ckpt = utils.load_checkpoint(str(path))
    assert ckpt['args']['model'] == 'SLIP_TINY'
    assert ckpt['args']['output_dir'] == '/checkpoint/x/123'
    fresh = models.create_model(ckpt['args']['model'], ckpt['args']['ssl_mlp_dim'], ckpt['args']['ssl_emb_dim'])
    fresh.load_state_dict(ckpt['state_dict'], strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)
