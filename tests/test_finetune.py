"""beit_finetuning: model geometry and weight loading, layer-wise lr decay, Mixup targets, schedule, end-to-end runs.

Everything runs on CPU with the tiny fine-tuning model (64 px, patch 8, width 64, depth 2), which matches the image
tower of models.SLIP_TINY, and a tiny ImageFolder written to tmp_path.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import models
import utils
from beit_finetuning import engine, finetune_data, finetune_model
from beit_finetuning import run_class_finetuning as rcf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLIP_FLAGS = ['--model_key', 'state_dict', '--model_prefix', 'module.visual.', '--disable_rel_pos_bias',
              '--abs_pos_emb', '--use_cls', '--layer_scale_init_value', '0', '--imagenet_default_mean_and_std']


def write_folder(root, classes=2, per_class=8, size=72, seed=0):
    rng = np.random.default_rng(seed)
    for c in range(classes):
        os.makedirs(os.path.join(root, f'class{c}'), exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8) // (c + 1)  # classes differ in brightness
            Image.fromarray(pixels).save(os.path.join(root, f'class{c}', f'{i}.png'))


@pytest.fixture(scope='module')
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp('imagenet')
    write_folder(str(root / 'train'), per_class=8)
    write_folder(str(root / 'val'), per_class=3, seed=1)
    return str(root)


@pytest.fixture(scope='module')
def slip_ckpt(tmp_path_factory, released_checkpoint):
    """A SLIP_TINY checkpoint as main.py writes it under DDP: every key prefixed with ``module.``, args a dict."""
    path = str(tmp_path_factory.mktemp('ckpt') / 'slip_tiny.pt')
    return path, released_checkpoint(path, 'SLIP_TINY', namespace=False)


def parse(*argv):
    return rcf.get_args_parser().parse_args([str(a) for a in argv])


def tiny_argv(data, out, *extra):
    argv = ['--model', 'beit_tiny_test', '--input_size', 64, '--batch_size', 4, '--data_path', data,
            '--output_dir', out, '--num_workers', 0, '--no_pin_mem', '--precision', 'fp32', '--device', 'cpu',
            '--lr', 1e-3, '--warmup_epochs', 1, '--save_ckpt_freq', 1, '--mixup', 0.8, '--cutmix', 1.0,
            *SLIP_FLAGS, *extra]
    return [str(a) for a in argv]


def finetune_args(data, out, *extra):
    return parse(*tiny_argv(data, out, *extra))


# ----------------------------------------------------------------------------------------------------------------
def test_parser_keeps_beit_defaults_and_seed_flags():
    args = parse('--batch_size', 128, '--enable_deepspeed', '--epochs', 100, '--warmup_epochs', 20, '--model',
                 'beit_base_patch16_224', '--nb_classes', 1000, '--mixup', 0.8, '--cutmix', 1, '--lr', 4e-3,
                 '--drop_path', 0.1, '--layer_decay', 0.65, '--output_dir', 'x', '--finetune', 'y', *SLIP_FLAGS)
    assert (args.weight_decay, args.smoothing, args.aa, args.reprob) == (0.05, 0.1, 'rand-m9-mstd0.5-inc1', 0.25)
    assert (args.warmup_lr, args.min_lr, args.update_freq, args.save_ckpt_freq) == (1e-6, 1e-6, 1, 5)
    assert args.auto_resume and args.enable_deepspeed and args.abs_pos_emb
    assert not args.rel_pos_bias and not args.use_mean_pooling and args.layer_scale_init_value == 0
    assert parse().rel_pos_bias and parse().use_mean_pooling  # BEiT's defaults when the flags are absent


def test_model_geometry_and_position_options():
    for name, (width, depth, heads) in {'beit_small_patch16_224': (384, 12, 12), 'beit_base_patch16_224': (768, 12, 12),
                                        'beit_large_patch16_224': (1024, 24, 16)}.items():
        with torch.device('meta'):
            m = finetune_model.create_finetune_model(name, 1000)
        assert (m.embed_dim, len(m.blocks), m.blocks[0].attn.num_heads) == (width, depth, heads)
        assert m.blocks[0].attn.qkv.bias is not None and m.norm.eps == 1e-6 and m.global_pool == 'token'
    with pytest.raises(ValueError, match='--disable_rel_pos_bias --abs_pos_emb'):
        finetune_model.create_finetune_model('beit_tiny_test', 10, 64, rel_pos_bias=True)
    with pytest.raises(ValueError, match='abs_pos_emb'):
        finetune_model.create_finetune_model('beit_tiny_test', 10, 64, rel_pos_bias=False, abs_pos_emb=False)
    with_ls = finetune_model.create_finetune_model('beit_tiny_test', 10, 64, layer_scale_init_value=0.1)
    assert 'blocks.0.ls1.gamma' in with_ls.state_dict()
    assert not any('gamma' in k for k in finetune_model.create_finetune_model('beit_tiny_test', 10, 64).state_dict())


def test_slip_checkpoint_loads_into_the_backbone(slip_ckpt, tmp_path):
    path, slip = slip_ckpt
    model = finetune_model.create_finetune_model('beit_tiny_test', 7, 64, use_cls=True)
    missing, unexpected = finetune_model.load_pretrained(model, path, 'state_dict', 'module.visual.')
    assert sorted(missing) == ['head.bias', 'head.weight'] and unexpected == []
    own = model.state_dict()
    for k, v in slip.visual.state_dict().items():
        assert torch.equal(own[k], v), k
    assert 1e-5 < model.head.weight.std() < 3e-5 and model.head.bias.abs().max() == 0  # trunc-normal .02 x 0.001
    # A checkpoint written without DDP (no module. prefix) through the funnel loads the same way.
    utils.save_checkpoint({'state_dict': slip.state_dict(), 'args': {}}, False, str(tmp_path), 'plain.pt')
    mean_pool = finetune_model.create_finetune_model('beit_tiny_test', 7, 64, use_cls=False)
    missing, unexpected = finetune_model.load_pretrained(mean_pool, str(tmp_path / 'plain.pt'), 'state_dict',
                                                         'module.visual.')
    assert sorted(unexpected) == ['norm.bias', 'norm.weight']  # mean pooling uses fc_norm instead, as BEiT
    assert sorted(missing) == ['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']
    assert torch.equal(mean_pool.blocks[1].mlp.fc2.weight, slip.visual.blocks[1].mlp.fc2.weight)
    with pytest.raises(utils.CheckpointError, match='model_prefix'):
        finetune_model.load_pretrained(model, path, 'state_dict', 'module.image_encoder.')


def test_position_embedding_is_interpolated_for_a_larger_input(slip_ckpt):
    path, slip = slip_ckpt
    model = finetune_model.create_finetune_model('beit_tiny_test', 7, 96)  # 12x12 grid instead of 8x8
    finetune_model.load_pretrained(model, path, 'state_dict', 'module.visual.')
    assert model.pos_embed.shape == (1, 1 + 144, 64)
    assert torch.equal(model.pos_embed[:, 0], slip.visual.pos_embed[:, 0])  # the class-token slot is kept


@pytest.mark.parametrize('use_cls', [True, False])
def test_layer_decay_groups(use_cls):
    model = finetune_model.create_finetune_model('beit_tiny_test', 5, 64, use_cls=use_cls)
    decay, depth = 0.65, 2
    groups = finetune_model.param_groups_layer_decay(model, 0.05, decay)
    where = {n: g for g in groups for n in g['param_names']}
    assert set(where) == {n for n, _ in model.named_parameters()}
    expected = {'cls_token': 0, 'pos_embed': 0, 'patch_embed.proj.weight': 0, 'blocks.0.attn.qkv.weight': 1,
                'blocks.1.mlp.fc2.bias': 2, 'head.weight': 3, 'head.bias': 3,
                ('norm.weight' if use_cls else 'fc_norm.weight'): 3}
    for name, layer in expected.items():
        assert where[name]['layer_id'] == layer, name
        assert where[name]['lr_scale'] == pytest.approx(decay ** (depth + 1 - layer)), name
    for name in ('cls_token', 'pos_embed', 'blocks.0.norm1.weight', 'blocks.0.attn.qkv.bias', 'head.bias'):
        assert where[name]['weight_decay'] == 0.0, name
    for name in ('patch_embed.proj.weight', 'blocks.1.mlp.fc1.weight', 'head.weight'):
        assert where[name]['weight_decay'] == 0.05, name
    args = parse('--layer_decay', decay, '--lr', 0.1)
    optimizer = rcf.build_optimizer(model, args)
    engine.set_schedule(optimizer, 0.1, 0.02)
    for g in optimizer.param_groups:
        assert g['lr'] == pytest.approx(0.1 * decay ** (depth + 1 - g['layer_id']))
        assert g['weight_decay'] in (0.0, 0.02)
    assert all(g['lr_scale'] == 1.0 for g in finetune_model.param_groups_layer_decay(model, 0.05, 1.0))


def test_mixup_cutmix_targets_sum_to_one():
    args = parse('--mixup', 0.8, '--cutmix', 1.0, '--nb_classes', 5, '--batch_size', 8)
    mixup = finetune_data.build_mixup(args)
    torch.manual_seed(0)
    images, labels = torch.rand(8, 3, 32, 32), torch.arange(8) % 5
    for _ in range(6):  # both mixup and cutmix get drawn (switch probability 0.5)
        x, y = mixup(images.clone(), labels)
        assert y.shape == (8, 5) and torch.allclose(y.sum(1), torch.ones(8))
        assert y.min() > 0 and not torch.equal(x, images)  # smoothing 0.1 spreads mass; pixels were mixed
    assert finetune_data.build_mixup(parse('--nb_classes', 5)) is None
    with pytest.raises(ValueError, match='even'):
        finetune_data.build_mixup(parse('--mixup', 0.8, '--nb_classes', 5, '--batch_size', 7))


def test_randaugment_posterize_to_zero_bits_gives_black_not_an_error():
    # Magnitude 10 (the clip value of rand-m9-mstd0.5 draws) makes PosterizeIncreasing keep 0 bits.
    args = parse('--input_size', 32, '--aa', 'rand-m10-mstd0-inc1')
    transform = finetune_data.build_transform(True, args)
    ops = [op for t in transform.transforms for op in getattr(t, 'ops', []) if op.name == 'PosterizeIncreasing']
    assert len(ops) == 1
    ops[0].prob = 1.0
    img = Image.fromarray(np.full((40, 40, 3), 200, dtype=np.uint8))
    assert np.asarray(ops[0](img)).max() == 0
    assert np.asarray(finetune_data.posterize_zero_bits_black(img, 1)).max() == 128


def test_schedule_warmup_and_cosine():
    args = parse('--lr', 4e-3, '--epochs', 10, '--warmup_epochs', 2, '--weight_decay_end', 0.1)
    lr, wd, steps = rcf.build_schedules(args, 5)
    assert len(lr) == len(wd) == 50 and steps == 5
    assert lr[0] == pytest.approx(1e-6) and lr[9] == pytest.approx(4e-3) and np.argmax(lr) in (9, 10)
    assert np.all(np.diff(lr[10:]) <= 0) and lr[-1] >= 1e-6
    assert wd[0] == pytest.approx(0.05) and wd[-1] == pytest.approx(0.1, abs=1e-3)
    with pytest.raises(ValueError, match='warm-up'):
        rcf.build_schedules(parse('--epochs', 2, '--warmup_epochs', 3), 5)


def test_missing_data_folder_is_named(tmp_path):
    args = finetune_args(str(tmp_path / 'nowhere'), str(tmp_path / 'out'))
    with pytest.raises(FileNotFoundError, match='nowhere'):
        finetune_data.build_dataset(True, args)


def test_finetune_end_to_end_then_resume(imagenet, slip_ckpt, tmp_path):
    path, slip = slip_ckpt
    out = str(tmp_path / 'out')
    stats = rcf.main(finetune_args(imagenet, out, '--epochs', 1, '--finetune', path, '--model_ema'))
    assert {'train_loss', 'test_acc1', 'test_acc5', 'best_acc1'} <= set(stats)
    assert {'checkpoint-last.pth', 'checkpoint-0.pth', 'checkpoint-best.pth', 'log.txt'} <= set(os.listdir(out))
    first = utils.load_checkpoint(os.path.join(out, 'checkpoint-last.pth'))
    assert first['epoch'] == 0 and 'model_ema' in first and first['args']['nb_classes'] == 2
    assert not torch.equal(first['state_dict']['blocks.0.attn.qkv.weight'], slip.visual.blocks[0].attn.qkv.weight)
    # Rerun with more epochs (a schedule change: --resume_override): auto-resume continues at epoch 1 with the
    # optimizer state (4 steps per epoch).
    rcf.main(finetune_args(imagenet, out, '--epochs', 2, '--finetune', path, '--model_ema', '--resume_override'))
    lines = [json.loads(x) for x in open(os.path.join(out, 'log.txt'))]
    assert [x['epoch'] for x in lines] == [0, 1]
    last = utils.load_checkpoint(os.path.join(out, 'checkpoint-last.pth'))
    assert last['epoch'] == 1 and os.path.isfile(os.path.join(out, 'checkpoint-1.pth'))
    assert {int(s['step']) for s in last['optimizer']['state'].values()} == {8}
    # --eval on the result reports accuracy without training.
    evaluated = rcf.main(finetune_args(imagenet, out, '--epochs', 2, '--eval'))
    assert evaluated['acc1'] == pytest.approx(lines[-1]['test_acc1'])  # the same weights as the last epoch's check


def test_benchmark_flag_reports_throughput():
    args = parse('--model', 'beit_tiny_test', '--input_size', 64, '--batch_size', 4, '--benchmark_steps', 2,
                 '--device', 'cpu', '--precision', 'amp_bf16', '--mixup', 0.8, '--cutmix', 1, *SLIP_FLAGS)
    result = rcf.main(args)
    assert result['images_per_s'] > 0 and result['precision'] == 'amp_bf16'


@pytest.mark.dist
def test_two_process_gloo_run(imagenet, slip_ckpt, tmp_path):
    path, _ = slip_ckpt
    out = str(tmp_path / 'dist')
    script = os.path.join(REPO, 'beit_finetuning', 'run_class_finetuning.py')
    cli = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', script,
           *tiny_argv(imagenet, out, '--epochs', 1, '--batch_size', 2, '--finetune', path)]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(cli, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = utils.load_checkpoint(os.path.join(out, 'checkpoint-last.pth'))
    assert ckpt['args']['world_size'] == 2 and ckpt['args']['distributed'] is True
    record = json.loads(open(os.path.join(out, 'log.txt')).readline())
    # the two shards' gathered accuracy is exactly the single-process evaluation of the same weights
    single = rcf.main(finetune_args(imagenet, out, '--epochs', 1, '--batch_size', 2, '--eval'))
    assert record['epoch'] == 0 and record['test_acc1'] == pytest.approx(single['acc1'])
