"""Cheaper SimCLR views: --ssl-view-size (smaller views, timm's resampled position embedding) and --ssl-mask-ratio /
--clip-mask-ratio (kept patch tokens drawn per sample). Defaults bitwise, shapes, masks, accumulation, resume, FLOPs."""
import argparse
import copy
import subprocess

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import augment
import bench
import datasets
import main as main_script
import models
import towers
import utils
from test_main import REPO, _run_cli
from conftest import assert_same_weights


def _data_args(**kw):
    base = dict(dataset='demo', root='', metadata='', model='SLIP_TINY', seed=0, demo_samples=16, image_format='uint8')
    base.update(kw)
    return argparse.Namespace(**base)


def _tokenizer(caption):
    return torch.zeros(77, dtype=torch.long)


def _model(name='SLIP_TINY', dtype=torch.float64):
    torch.manual_seed(0)
    return models.create_model(name).to(dtype)


def _reference_class_token_features(visual, x):
    """The class-token-only ViT pass exactly as models.py computed it before the view options (the reference of
    the bitwise-default test)."""
    x = visual.norm_pre(visual.patch_drop(visual._pos_embed(visual.patch_embed(x))))
    for block in visual.blocks[:-1]:
        x = block(x)
    block, attn = visual.blocks[-1], visual.blocks[-1].attn
    y = block.norm1(x)
    B, N, _ = y.shape
    H, d, A = attn.num_heads, attn.head_dim, attn.attn_dim
    w, b = attn.qkv.weight, attn.qkv.bias
    q = F.linear(y[:, :1], w[:A], b[:A]).view(B, 1, H, d).transpose(1, 2)
    k, v = F.linear(y, w[A:], b[A:]).view(B, N, 2, H, d).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    o = F.scaled_dot_product_attention(q, k, v)
    o = attn.proj_drop(attn.proj(attn.norm(o.transpose(1, 2).reshape(B, 1, A))))
    x = x[:, :1] + block.drop_path1(block.ls1(o))
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return visual.forward_head(visual.norm(x))


# ----------------------------------------------------------------------------------------------------------------
# Defaults
# ----------------------------------------------------------------------------------------------------------------
def test_defaults_give_the_previous_outputs_bitwise():
    model = _model(dtype=torch.float32)
    batch = bench.synthetic_batch(models.get_spec('SLIP_TINY'), 8, 'cpu', seed=1)
    assert batch.aug1_keep is None and batch.aug2_keep is None and batch.image_keep is None
    out = model.towers(batch)
    h1, h2, h = _reference_class_token_features(model.visual, torch.cat([batch.aug1, batch.aug2, batch.image])).chunk(3)
    assert torch.equal(out['aug1_feat'], h1) and torch.equal(out['aug2_feat'], h2)
    assert torch.equal(out['image_embed'], h @ model.image_projection)
    models.set_fast_paths(model, False)  # and the plain path is still timm's own forward, view by view
    out = model.towers(batch)
    assert torch.equal(out['aug1_feat'], model.visual(batch.aug1))
    assert torch.equal(out['image_embed'], model.visual(batch.image) @ model.image_projection)


def test_dynamic_size_leaves_full_size_views_and_keys_bitwise():
    model = _model(dtype=torch.float32)
    static = copy.deepcopy(model)
    keys = list(model.state_dict())
    models.set_dynamic_img_size(model.visual)
    assert list(model.state_dict()) == keys  # released checkpoints load as before
    x = torch.randn(4, 3, 64, 64)
    assert torch.equal(model.visual(x), static.visual(x))
    assert torch.equal(model.encode_image(x), static.encode_image(x))
    models.set_dynamic_img_size(model.visual, False)
    with pytest.raises(AssertionError):  # back to timm's fixed size
        model.visual(torch.randn(1, 3, 32, 32))


def test_unmasked_samples_are_unchanged_by_the_options():
    """The kept tokens are drawn after every other draw: views and tokens are the same with and without masking."""
    plain = datasets.get_train_dataset(_data_args(), _tokenizer)
    masked = datasets.get_train_dataset(_data_args(ssl_mask_ratio=0.5, clip_mask_ratio=0.25), _tokenizer)
    for ds in (plain, masked):
        ds.set_epoch(1)
    a, b = plain[3], masked[3]
    assert a.aug1_keep is None and a.image_keep is None
    for name in ('image', 'text', 'aug1', 'aug2'):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# ----------------------------------------------------------------------------------------------------------------
# View size
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('image_format', ['uint8', 'device_augment'])
def test_ssl_view_size_makes_smaller_simclr_views_only(image_format):
    ds = datasets.get_train_dataset(_data_args(ssl_view_size=32, image_format=image_format), _tokenizer)
    ds.set_epoch(0)
    s = ds[0]
    assert s.aug1.shape == s.aug2.shape == (32, 32, 3) and s.image.shape == (64, 64, 3)
    batch = augment.finish_views(augment.Batch.collate([s, ds[1]]))
    assert batch.aug1.shape == (2, 3, 32, 32) and batch.image.shape == (2, 3, 64, 64)


def test_view_size_reaches_the_model_with_timms_position_embedding():
    model = _model()
    models.set_dynamic_img_size(model.visual)
    timm_vit = timm.create_model('vit_base_patch16_224', pretrained=False, num_classes=0, img_size=64, patch_size=8,
                                 embed_dim=64, depth=2, num_heads=4, dynamic_img_size=True).double()
    timm_vit.load_state_dict(model.visual.state_dict(), strict=True)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    # the position embedding of a 4x4 grid, resampled by timm from the 8x8 one, and the tokens it gives
    timm_tokens = timm_vit.norm_pre(timm_vit._pos_embed(timm_vit.patch_embed(x)))
    assert torch.equal(models.vit_embed(model.visual, x), timm_tokens)
    assert models.vit_embed(model.visual, x).shape == (3, 1 + 16, 64)
    torch.testing.assert_close(model.visual(x), timm_vit(x), rtol=0, atol=0)
    torch.testing.assert_close(models.visual_forward(model.visual, x), timm_vit(x), rtol=1e-10, atol=1e-12)
    batch = bench.synthetic_batch(models.get_spec('SLIP_TINY'), 4, 'cpu', ssl_view_size=32)
    batch = batch.apply(lambda t: t.double() if t.is_floating_point() else t)
    out = model(batch)
    assert out['aug1_embed'].shape == out['aug2_embed'].shape == (4, 64) and out['image_embed'].shape == (4, 64)


def test_views_of_one_shape_share_a_pass_and_equal_separate_passes(monkeypatch):
    model = _model()
    models.set_dynamic_img_size(model.visual)
    batch = bench.synthetic_batch(models.get_spec('SLIP_TINY'), 4, 'cpu', ssl_view_size=32, ssl_mask_ratio=0.5)
    batch = batch.apply(lambda t: t.double() if t.is_floating_point() else t)
    fused = model.towers(batch)
    calls = []
    real = towers.visual_forward
    monkeypatch.setattr(towers, 'visual_forward', lambda v, x, *a, **k: calls.append(x.shape[0]) or real(v, x, *a, **k))
    model.towers(batch)
    assert calls == [8, 4]  # aug1 + aug2 together, then the full-size CLIP view
    monkeypatch.setattr(towers, 'visual_forward', real)
    model.fuse_views = False
    separate = model.towers(batch)
    for k in fused:
        torch.testing.assert_close(fused[k], separate[k], rtol=1e-10, atol=1e-12, msg=k)


# ----------------------------------------------------------------------------------------------------------------
# Masking
# ----------------------------------------------------------------------------------------------------------------
def test_keep_count_rounds_half_up_and_keeps_at_least_one():
    assert augment.keep_count(196, 0.5) == 98 and augment.keep_count(196, 0.75) == 49
    assert augment.keep_count(64, 0.5) == 32 and augment.keep_count(100, 0.5) == 50
    assert augment.keep_count(3, 0.5) == 2 and augment.keep_count(49, 0.75) == 12  # 1.5 -> 2, 12.25 -> 12
    assert augment.keep_count(4, 0.9) == 1 and augment.keep_count(10, 0.0) == 10
    with pytest.raises(ValueError):
        augment.keep_count(10, 1.0)


def test_mask_keeps_exactly_the_requested_tokens_and_the_class_token():
    ds = datasets.get_train_dataset(_data_args(ssl_mask_ratio=0.75, clip_mask_ratio=0.5), _tokenizer)
    ds.set_epoch(0)
    s = ds[2]
    assert s.aug1_keep.shape == s.aug2_keep.shape == (16,) and s.image_keep.shape == (32,)
    for keep in (s.aug1_keep, s.aug2_keep, s.image_keep):
        assert keep.dtype == torch.int64 and len(set(keep.tolist())) == len(keep)  # distinct patches
        assert 0 <= int(keep.min()) and int(keep.max()) < 64 and torch.equal(keep, keep.sort().values)
    assert not torch.equal(s.aug1_keep, s.aug2_keep)
    model = _model()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    keep = torch.stack([s.aug1_keep, s.aug2_keep])
    full, kept = models.vit_embed(model.visual, x), models.vit_embed(model.visual, x, keep)
    assert kept.shape == (2, 1 + 16, 64)
    assert torch.equal(kept[:, 0], full[:, 0])  # the class token, always first
    assert torch.equal(kept[:, 1:], torch.stack([full[i, 1 + keep[i]] for i in range(2)]))  # with their positions


def test_mask_is_the_same_for_the_same_seed_epoch_and_index():
    def sample(seed, epoch, index):
        ds = datasets.get_train_dataset(_data_args(seed=seed, ssl_mask_ratio=0.5, ssl_view_size=48), _tokenizer)
        ds.set_epoch(epoch)
        return ds[index]

    a, b = sample(0, 1, 5), sample(0, 1, 5)
    assert torch.equal(a.aug1_keep, b.aug1_keep) and torch.equal(a.aug2_keep, b.aug2_keep)
    assert a.aug1_keep.shape == (18,)  # 48 px / patch 8 = 36 patches, half kept
    for other in (sample(1, 1, 5), sample(0, 2, 5), sample(0, 1, 6)):
        assert not torch.equal(a.aug1_keep, other.aug1_keep)


def test_masked_class_token_path_equals_the_full_blocks_on_the_kept_tokens():
    model = _model()
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    keep = torch.stack([augment.draw_keep(64, 20, g) for _ in range(3)])
    fast = models.visual_forward(model.visual, x, True, keep)
    plain = models.vit_masked_features(model.visual, x, keep)
    torch.testing.assert_close(fast, plain, rtol=1e-10, atol=1e-12)
    every = torch.arange(64).expand(3, -1)  # keeping every patch is the unmasked computation
    torch.testing.assert_close(models.vit_masked_features(model.visual, x, every), model.visual(x), rtol=0, atol=0)


def test_clip_mask_is_for_training_only():
    model = _model()
    batch = bench.synthetic_batch(models.get_spec('SLIP_TINY'), 4, 'cpu', clip_mask_ratio=0.5)
    batch = batch.apply(lambda t: t.double() if t.is_floating_point() else t)
    assert batch.image_keep.shape == (4, 32)
    masked = model.towers(batch)['image_embed']
    unmasked = model.encode_image(batch.image)  # what eval_zeroshot and main_linear call
    torch.testing.assert_close(unmasked, models.visual_forward(model.visual, batch.image) @ model.image_projection)
    assert not torch.allclose(masked, unmasked)


@pytest.mark.parametrize('name', ['SIMCLR_TINY', 'SLIP_TINY'])
@pytest.mark.parametrize('view_size', [64, 32])
def test_exact_accumulation_with_both_options_equals_one_batch(name, view_size):
    """Float64 and exact up to summation order; with smaller views, up to float32 rounding, because timm resamples
    the position embedding in float32 (resample_abs_pos_embed casts it), whichever the model's dtype."""
    from test_engine import RTOL, _assert_same_training, _engine
    torch.manual_seed(0)
    a = models.create_model(name).double()
    models.set_dynamic_img_size(a.visual)
    b = copy.deepcopy(a)
    data = bench.synthetic_batch(models.get_spec(name), 16, 'cpu', ssl_view_size=view_size, ssl_mask_ratio=0.5,
                                 clip_mask_ratio=0.5 if name == 'SLIP_TINY' else 0.0)
    data = data.apply(lambda t: t.double() if t.is_floating_point() else t)
    metrics, outcome = _engine(a, name, update_freq=4).forward_backward(data.chunk(4))
    ref, _ = _engine(b, name).forward_backward([data])
    assert float(outcome[0]) == 0  # no rank with a non-finite loss
    if view_size == 64:
        return _assert_same_training(a, b, metrics['loss'], ref['loss'])
    torch.testing.assert_close(metrics['loss'], ref['loss'], rtol=RTOL, atol=0)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        scale = float(pb.grad.abs().max())
        torch.testing.assert_close(pa.grad, pb.grad, rtol=0, atol=1e-7 * max(scale, 1e-3), msg=n)


# ----------------------------------------------------------------------------------------------------------------
# FLOPs, flags, resume
# ----------------------------------------------------------------------------------------------------------------
def _tower_flops(model, batch):
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.towers(batch)
    return counter.get_total_flops()


def test_flops_fall_with_smaller_and_masked_views():
    model = _model(dtype=torch.float32)
    models.set_dynamic_img_size(model.visual)
    spec = models.get_spec('SLIP_TINY')
    flops = {opt: _tower_flops(model, bench.synthetic_batch(spec, 8, 'cpu', **dict(opt))) for opt in [
        (), (('ssl_mask_ratio', 0.5),), (('ssl_mask_ratio', 0.75),), (('ssl_view_size', 32),),
        (('ssl_view_size', 32), ('ssl_mask_ratio', 0.5)), (('clip_mask_ratio', 0.5),)]}
    f = list(flops.values())
    default, half, quarter, small, small_half, clip_half = f
    assert default > half > quarter > small_half and half > small > small_half  # patches: 64 > 32 > 16 > 8
    # a 32-px view has 16 patches (4 x 4), as many as a 64-px view keeps at 0.75, which still embeds all 64: the
    # difference is exactly the patch embedding (a matmul of 3 x 8 x 8 -> 64) of 48 patches, 2 views x 8 samples
    assert quarter - small == 2 * 8 * 48 * 2 * (3 * 8 * 8) * 64
    assert default > clip_half > half  # one view masked instead of two
    # the SimCLR views' share: a CLIP model's towers are the text and one full view, SLIP's two more views
    clip_batch = bench.synthetic_batch(models.get_spec('CLIP_TINY'), 8, 'cpu')
    clip = _tower_flops(_model('CLIP_TINY', torch.float32), clip_batch)
    per_view = (default - clip) / 2
    # 1 + 16 of 1 + 64 tokens in the blocks (the patch embedding still sees all 64): well under half of their work
    assert 0.2 < (quarter - clip) / (2 * per_view) < 0.45


def test_view_flags_are_checked_naming_the_flag():
    from test_main import tiny_args

    def resolve(*extra, model='SLIP_TINY'):
        args = tiny_args('/tmp/unused', model, *extra)
        main_script.resolve_args(args, torch.device('cpu'))
        return args

    args = resolve()
    assert args.ssl_view_size == 64 and args.ssl_mask_ratio == 0.0 and args.clip_mask_ratio == 0.0
    assert resolve('--ssl-view-size', 32, '--ssl-mask-ratio', 0.5).ssl_view_size == 32
    for extra, flag in [(('--ssl-view-size', 36), '--ssl-view-size'), (('--ssl-view-size', 72), '--ssl-view-size'),
                        (('--ssl-view-size', 0), '--ssl-view-size'), (('--ssl-mask-ratio', 1.0), '--ssl-mask-ratio'),
                        (('--clip-mask-ratio', -0.1), '--clip-mask-ratio')]:
        with pytest.raises(ValueError, match=flag):
            resolve(*extra)
    with pytest.raises(ValueError, match='--ssl-view-size'):
        resolve('--ssl-view-size', 32, model='CLIP_TINY')
    with pytest.raises(ValueError, match='--clip-mask-ratio'):
        resolve('--clip-mask-ratio', 0.5, model='SIMCLR_TINY')


def test_sigkill_and_restart_with_view_options_equals_uninterrupted_bitwise(tmp_path, sigkill_and_rerun):
    extra = ['--ssl-view-size', 32, '--ssl-mask-ratio', 0.5, '--clip-mask-ratio', 0.5, '--demo-samples', 64,
             '--epochs', 1]
    cmd, env = _run_cli(tmp_path / 'ref', extra)
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    cmd, env = _run_cli(tmp_path / 'killed', extra)
    sigkill_and_rerun(cmd, env, tmp_path / 'killed' / 'checkpoint.pt', step=3)
    assert_same_weights(tmp_path / 'ref' / 'checkpoint.pt', tmp_path / 'killed' / 'checkpoint.pt')


def test_options_run_under_bf16_autocast():
    model = _model(dtype=torch.float32)
    models.set_dynamic_img_size(model.visual)
    batch = bench.synthetic_batch(models.get_spec('SLIP_TINY'), 4, 'cpu', ssl_view_size=32, ssl_mask_ratio=0.5,
                                  clip_mask_ratio=0.5)
    with utils.autocast('amp_bf16', torch.device('cpu')):
        out = model(batch)
    loss = models.get_loss('SLIP_TINY')(out)['loss']
    loss.backward()
    assert torch.isfinite(loss) and model.visual.pos_embed.grad is not None
