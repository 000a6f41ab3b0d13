"""main_linear.py: both probe modes learn, resume continues exactly, global-batch lr, 12-head ViT-S, sanity check."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import main_linear
import models
import utils

COLORS = [(230, 30, 30), (30, 200, 40), (30, 60, 230), (230, 220, 40)]


def make_dataset(root, n_train=8, n_test=4):
    """4 colour classes in train/test ImageFolders, and a catalog naming them 'toy'."""
    for split, n in (('train', n_train), ('test', n_test)):
        for c, color in enumerate(COLORS):
            os.makedirs(root / 'toy' / split / f'c{c}', exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([c, i, split == 'test'])
                px = np.clip(np.array(color)[None, None] + rng.integers(-25, 26, (64, 64, 3)), 0, 255)
                Image.fromarray(px.astype(np.uint8)).save(root / 'toy' / split / f'c{c}' / f'{i}.png')
    catalog = root / 'catalog.json'
    catalog.write_text(json.dumps({'toy': {'path': str(root / 'toy'), 'type': 'imagefolder', 'train': 'train',
                                           'test': 'test'}}))
    return str(catalog)


@pytest.fixture(scope='module')
def setup(tmp_path_factory, released_checkpoint):
    root = tmp_path_factory.mktemp('linear')
    catalog = make_dataset(root)
    released_checkpoint(root / 'slip.pt', 'SLIP_TINY')  # released layout: DDP 'module.' keys, argparse.Namespace
    return root, catalog, str(root / 'slip.pt')


def linear_args(out, catalog, pretrained, *extra):
    return main_linear.get_args_parser().parse_args([
        '--dataset', 'toy', '--catalog', catalog, '--pretrained', pretrained, '--output-dir', str(out), '-j', '0',
        '--device', 'cpu', '--seed', '0', '--print-freq', '100', *extra])


def read_log(out, lr):
    with open(out / f'linear_toy_lr={lr}_log.txt') as f:
        return [json.loads(line) for line in f]


def test_both_modes_learn_and_agree(setup, tmp_path):
    root, catalog, pretrained = setup
    accs = {}
    for mode in ('full', 'cached'):
        out = tmp_path / mode
        os.makedirs(out)
        extra = ['--cached-features'] if mode == 'cached' else []
        stats = main_linear.main(linear_args(out, catalog, pretrained, '--epochs', '4', '-b', '8', '--lr', '2',
                                             '--eval-freq', '3', *extra))
        log = read_log(out, 2.0)
        assert [r['epoch'] for r in log] == list(range(4))
        assert [('test_acc1' in r) for r in log] == [False, False, True, True]  # every 3rd and the last
        ckpt = utils.load_checkpoint(str(out / 'linear_best.pt'))
        assert ckpt['state_dict']['head.weight'].shape == (4, 64)  # the dataset's classes, not 1000
        accs[mode] = stats['test_acc1']
    assert min(accs.values()) >= 75, accs  # chance is 25
    assert abs(accs['full'] - accs['cached']) <= 25, accs


class Interrupt(Exception):
    pass


def test_resume_continues_exactly(setup, tmp_path, monkeypatch):
    root, catalog, pretrained = setup
    # full batch (32 samples): training does not depend on the shuffling order, so runs can be compared exactly
    common = ['--epochs', '4', '-b', '32', '--lr', '1', '--eval-freq', '2', '--cached-features']
    straight = main_linear.main(linear_args(tmp_path / 'a', catalog, pretrained, *common))
    append = utils.append_json_line

    def append_then_die(path, record):  # the run is killed at the end of its second epoch
        append(path, record)
        if record['epoch'] == 1:
            raise Interrupt
    monkeypatch.setattr(utils, 'append_json_line', append_then_die)
    with pytest.raises(Interrupt):
        main_linear.main(linear_args(tmp_path / 'b', catalog, pretrained, *common))
    monkeypatch.setattr(utils, 'append_json_line', append)
    first = utils.load_checkpoint(str(tmp_path / 'b' / 'linear_checkpoint.pt'))
    assert first['epoch'] == 2 and isinstance(first['best_acc1'], float)
    resumed = main_linear.main(linear_args(tmp_path / 'b', catalog, pretrained, *common))  # auto-resume
    log = read_log(tmp_path / 'b', 1.0)
    assert [r['epoch'] for r in log] == [0, 1, 2, 3] and 0 < log[1]['train_loss'] and log[3]['train_loss'] > 1e-3
    a = utils.load_checkpoint(str(tmp_path / 'a' / 'linear_checkpoint.pt'))
    b = utils.load_checkpoint(str(tmp_path / 'b' / 'linear_checkpoint.pt'))
    torch.testing.assert_close(a['state_dict'], b['state_dict'], atol=1e-5, rtol=1e-5)
    assert resumed['test_acc1'] == pytest.approx(straight['test_acc1'])
    # --evaluate with the best head reproduces the best top-1
    stats = main_linear.main(linear_args(tmp_path / 'b', catalog, pretrained, '--evaluate', '--resume',
                                         str(tmp_path / 'b' / 'linear_best.pt'), '--cached-features'))
    assert stats['acc1'] == pytest.approx(b['best_acc1'])


def test_lr_scales_with_the_global_batch(setup, tmp_path):
    assert main_linear.scaled_lr(0.1, 128, 8) == pytest.approx(0.4)  # the original gave 0.1 * 16 / 256
    root, catalog, pretrained = setup
    main_linear.main(linear_args(tmp_path, catalog, pretrained, '--epochs', '2', '-b', '16', '--lr', '0.5',
                                 '--cached-features'))
    log = read_log(tmp_path, 0.5)
    assert log[0]['lr'] == pytest.approx(0.5 * 16 / 256)
    assert log[1]['lr'] == pytest.approx(0.5 * 16 / 256 * 0.5)  # cosine at epoch 1 of 2


def test_vit_small_without_model_name_gets_12_heads_and_sanity_check(tmp_path):
    import timm
    torch.manual_seed(0)
    reference = timm.create_model('vit_small_patch16_224', pretrained=False, num_classes=0, num_heads=12)
    ckpt = {'state_dict': {f'visual.{k}': v for k, v in reference.state_dict().items()}, 'args': {}}
    backbone, size, weights = main_linear.build_backbone(ckpt, 'bare.pt', 'vit_small_patch16_224')
    assert size == 224 and all(block.attn.num_heads == 12 for block in backbone.blocks)
    assert not any(p.requires_grad for p in backbone.parameters())
    main_linear.sanity_check(backbone, weights, 'bare.pt')
    with torch.no_grad():
        backbone.blocks[0].attn.qkv.weight[0, 0] += 1
    with pytest.raises(RuntimeError, match='blocks.0.attn.qkv.weight'):
        main_linear.sanity_check(backbone, weights, 'bare.pt')
    with pytest.raises(utils.CheckpointError, match='no visual'):
        main_linear.build_backbone({'state_dict': {'x': torch.zeros(1)}, 'args': {}}, 'bad.pt', 'vit_small_patch16_224')


# ----------------------------------------------------------------------------------------------------------------
# Two gloo processes: DDP head, sharded feature extraction, global-batch lr
# ----------------------------------------------------------------------------------------------------------------
def _linear_worker(rank, world, port, catalog, pretrained, out):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    stats = main_linear.main(linear_args(out, catalog, pretrained, '--epochs', '3', '-b', '4', '--lr', '4',
                                         '--eval-freq', '3', '--cached-features'))
    torch.save(stats, os.path.join(out, f'stats{rank}.pt'))
    torch.distributed.destroy_process_group()


@pytest.mark.dist
def test_two_process_probe(setup, tmp_path):
    import socket
    root, catalog, pretrained = setup
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(_linear_worker, args=(2, port, catalog, pretrained, str(tmp_path)),
                                          nprocs=2, start_method='fork')
    stats = [torch.load(tmp_path / f'stats{r}.pt') for r in range(2)]
    assert stats[0]['test_acc1'] == stats[1]['test_acc1'] >= 75  # metrics summed over both shards, same on each
    log = read_log(tmp_path, 4.0)
    assert log[0]['lr'] == pytest.approx(4 * 4 * 2 / 256)  # global batch 8
