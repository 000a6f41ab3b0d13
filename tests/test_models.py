"""Registry, checkpoint-compatible layouts, forward/backward of the tiny models, and the exact compute shortcuts."""
import json
import os

import pytest
import torch

import augment
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
    assert models._class_token_only_ok(model.visual)  # the released towers take the class-token-only shortcut


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
    assert not models._class_token_only_ok(model.visual)  # not a ViT: runs whole


def _inputs(name, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = models.get_spec(name).image_size
    image, aug1, aug2 = (torch.randn(batch, 3, size, size, generator=g) for _ in range(3))
    tok = utils.Tokenizer()
    text = tok(['a dog', 'a red circle on a grey background', 'hello', 'x y z w v'][:batch])
    fields = {'clip': dict(image=image, text=text), 'simclr': dict(aug1=aug1, aug2=aug2),
              'slip': dict(image=image, text=text, aug1=aug1, aug2=aug2)}[models.get_spec(name).family]
    return augment.Batch(**fields)


@pytest.mark.parametrize('name', TINY)
def test_tiny_forward_backward_every_parameter_gets_gradient(name):
    torch.manual_seed(0)
    model = models.create_model(name)
    out = model(_inputs(name))
    expected = {'clip': {'image_embed', 'text_embed', 'logit_scale'}, 'simclr': {'aug1_embed', 'aug2_embed'},
                'slip': {'image_embed', 'text_embed', 'logit_scale', 'aug1_embed', 'aug2_embed'}}
    assert set(out) == expected[models.get_spec(name).family]
    if 'logit_scale' in out:
        assert torch.allclose(out['logit_scale'], torch.tensor(1 / 0.07))  # exponentiated
    loss = models.get_loss(name)(out)['loss']
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


@pytest.mark.parametrize('name,checkpointing', [('CLIP_TINY', False), ('SIMCLR_TINY', False), ('SLIP_TINY', False),
                                                 ('SLIP_TINY', True)])
def test_fast_paths_equal_plain_computation(name, checkpointing):
    """One concatenated ViT pass with a class-token-only last block (and packed text) gives the outputs, BN
    statistics and gradients of separate full passes.

    In float64, so that only a real difference (not float32 summation order) can fail the comparison.
    """
    torch.manual_seed(0)
    fast = models.create_model(name).double()
    slow = models.create_model(name).double()
    slow.load_state_dict(fast.state_dict())
    models.set_fast_paths(slow, False)
    assert models._class_token_only_ok(fast.visual)  # the shortcut really runs
    fast.set_grad_checkpointing(checkpointing)
    inputs = _inputs(name).apply(lambda x: x.double() if x.is_floating_point() else x)
    out_fast, out_slow = fast(inputs), slow(inputs)
    for k in out_fast:
        torch.testing.assert_close(out_fast[k], out_slow[k], atol=1e-10, rtol=1e-10)
    models.get_loss(name)(out_fast)['loss'].backward()
    models.get_loss(name)(out_slow)['loss'].backward()
    for (n, a), (_, b) in zip(fast.named_parameters(), slow.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-10, msg=n)
    for (n, a), (_, b) in zip(fast.named_buffers(), slow.named_buffers()):
        torch.testing.assert_close(a, b, msg=n)  # BatchNorm running stats updated identically


@pytest.mark.parametrize('checkpointing', [False, True])
def test_packed_text_equals_full_context(checkpointing):
    """Each caption run only up to its end-of-text token, packed, gives the full-context embeddings and gradients.

    In float64, so that only a real difference (not float32 summation order) can fail the comparison.
    """
    torch.manual_seed(0)
    fast = models.create_model('CLIP_TINY').double()
    slow = models.create_model('CLIP_TINY').double()
    slow.load_state_dict(fast.state_dict())
    slow.truncate_text = False
    fast.set_grad_checkpointing(checkpointing)
    tok = utils.Tokenizer()
    text = tok(['a', 'a much longer caption with quite a few more words in it than the first', 'b c', 'dog ' * 100])
    assert int(text.argmax(-1).min()) < 5 and int(text.argmax(-1).max()) == 76  # lengths from 3 to the full 77
    short, full = fast.encode_text(text), slow.encode_text(text)
    torch.testing.assert_close(short, full, atol=1e-10, rtol=1e-10)
    (short ** 2).sum().backward()
    (full ** 2).sum().backward()
    for (n, a), (_, b) in zip(fast.named_parameters(), slow.named_parameters()):
        assert (a.grad is None) == (b.grad is None), n  # the same parameters reach the text embedding
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-10, msg=n)
    # over-long captions keep their end-of-text token, so they do not collapse to one embedding
    emb = fast.encode_text(tok(['dog ' * 100, 'cat ' * 100]))
    assert not torch.allclose(emb[0], emb[1])


def test_packed_text_does_less_work():
    from torch.utils.flop_counter import FlopCounterMode
    model = models.create_model('CLIP_TINY')
    text = utils.Tokenizer()(['a photo of a dog', 'a cat'])
    flops = {}
    for packed in (True, False):
        model.truncate_text = packed
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model.encode_text(text)
        flops[packed] = counter.get_total_flops()
    assert flops[True] * 8 < flops[False]  # 7 + 4 tokens instead of 2 x 77


def test_unfused_attention_equals_fused():
    torch.manual_seed(0)
    model = models.create_model('SLIP_TINY').eval()
    inputs = _inputs('SLIP_TINY')
    with torch.no_grad():
        fused = model(inputs)
        for m in model.modules():
            if isinstance(m, models.CausalSelfAttention):
                m.fused = False
            if hasattr(m, 'fused_attn'):
                m.fused_attn = False
        plain = model(inputs)
    for k in fused:
        torch.testing.assert_close(fused[k], plain[k], atol=1e-5, rtol=1e-5)


class _BackwardOps(torch.utils._python_dispatch.TorchDispatchMode):
    """The aten ops a block of code runs (a backward, here), by name."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('tower', ['VIT_TINY', 'VIT_B'])
def test_split_heads_attention_equals_timms_and_copies_less_in_its_backward(tower, fused):
    """SplitHeadsAttention (every registered ViT's attention) against timm's own forward on the same module, float64:
    equal outputs and gradients (1e-12) with dropout off, fused and plain; its fused backward stacks the heads'
    gradients once with no further copy, where timm's permuted layout adds a clone of the whole q/k/v gradient."""
    from timm.layers import Attention
    torch.manual_seed(0)
    visual = models._vit(getattr(models, tower)).double()
    attn = visual.blocks[0].attn
    assert type(attn) is models.SplitHeadsAttention and set(attn.state_dict()) == {'qkv.weight', 'qkv.bias',
                                                                                  'proj.weight', 'proj.bias'}
    attn.fused_attn = fused
    x = torch.randn(2, 17, visual.embed_dim, dtype=torch.float64)
    results = {}
    for cls in (models.SplitHeadsAttention, Attention):
        attn.__class__ = cls
        xi = x.clone().requires_grad_()
        y = attn(xi)
        with _BackwardOps() as ops:
            y.backward(torch.ones_like(y))
        results[cls] = y.detach(), xi.grad, attn.qkv.weight.grad.clone(), ops.ops
        attn.zero_grad()
    ours, timms = results[models.SplitHeadsAttention], results[Attention]
    for a, b in zip(ours[:3], timms[:3]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if fused:  # (the plain path's batched matmuls copy their transposed operands in either layout)
        assert ours[3].count('stack') == 1 and 'clone' not in ours[3] and 'copy_' not in ours[3]
        assert 'clone' in timms[3] or 'copy_' in timms[3]  # what the layout saves: the check can fail


def test_text_attention_backward_stacks_its_heads_gradients_with_no_copy():
    attn = models.CausalSelfAttention(64, 4)
    y = attn(torch.randn(3, 9, 64, requires_grad=True))
    with _BackwardOps() as ops:
        y.backward(torch.ones_like(y))
    assert ops.ops.count('stack') == 1 and 'clone' not in ops.ops and 'copy_' not in ops.ops


def test_every_registered_vit_uses_split_heads_and_keeps_the_released_keys():
    from timm.layers import Attention
    for name in ('CLIP_VITS16', 'SLIP_VITB16', 'SIMCLR_VITL16'):
        model = models.create_model(name)
        kinds = {type(m) for m in model.visual.modules() if isinstance(m, Attention)}
        assert kinds == {models.SplitHeadsAttention}, name
    visual = models._vit(models.VIT_TINY)
    before = {k: v.clone() for k, v in visual.state_dict().items()}
    assert models.use_split_heads(visual) == 0  # already switched: nothing left to switch
    models.set_fast_paths(visual, False)  # the baseline runs timm's own attention
    assert type(visual.blocks[0].attn) is Attention
    models.set_fast_paths(visual, True)
    assert type(visual.blocks[0].attn) is models.SplitHeadsAttention
    assert all(torch.equal(before[k], v) for k, v in visual.state_dict().items())


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


def test_rn50_forward_backward_every_parameter_gets_gradient():
    import losses
    torch.manual_seed(0)
    model = models.create_model('CLIP_RN50')
    image = torch.randn(2, 3, 224, 224)
    text = utils.Tokenizer()(['a photo of a dog', 'a red circle'])
    out = model(augment.Batch(image=image, text=text))
    assert set(out) == {'image_embed', 'text_embed', 'logit_scale'}
    assert out['image_embed'].shape == out['text_embed'].shape == (2, 512)
    losses.CLIPLoss()(out)['loss'].backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad
    assert model.visual.attnpool.c_proj.weight.grad.abs().sum() > 0  # the attention pooling is trained
