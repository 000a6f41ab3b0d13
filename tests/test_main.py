"""main.py end to end on the generated demo data: every family, resume, kill-and-resume, 2 gloo processes, guards."""
import argparse
import json
import logging
import math
import os
import subprocess
import sys

import pytest
import torch

import main as main_script
import utils
from conftest import assert_same_weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(*argv):
    parser = argparse.ArgumentParser(parents=[main_script.get_args_parser()])
    return parser.parse_args([str(a) for a in argv])


CATALOG = None  # the small demo catalog (conftest's small_catalog, in pytest's temporary folder), set per module


@pytest.fixture(autouse=True, scope='module')
def _small_catalog(small_catalog):
    global CATALOG
    CATALOG = small_catalog


def tiny_args(out, model='SLIP_TINY', *extra):
    return parse('--dataset', 'demo', '--catalog', CATALOG, '--model', model, '--demo-samples', 64, '--batch-size', 8, '--epochs', 2,
                 '--workers', 0, '--precision', 'fp32', '--output-dir', out, '--print-freq', 4,
                 '--warmup-epochs', 1, '--lr', 1e-3, *extra)


def _weights(path):
    return utils.load_checkpoint(str(path))['state_dict']


@pytest.mark.parametrize('model', ['CLIP_TINY', 'SIMCLR_TINY', 'SLIP_TINY'])
def test_main_trains_each_family_and_writes_outputs(tmp_path, model):
    stats = main_script.main(tiny_args(tmp_path, model))
    assert stats['epoch'] == 1
    lines = [json.loads(x) for x in (tmp_path / 'log.txt').read_text().splitlines()]
    assert [x['epoch'] for x in lines] == [0, 1]
    assert 'train_loss' in lines[0] and 'train_lr' in lines[0] and lines[0]['train_bad_samples'] == 0
    if model == 'SIMCLR_TINY':
        assert 'train_ssl_acc' in lines[0] and 'test_acc1' not in lines[0]
        assert not (tmp_path / 'checkpoint_best.pt').exists()
    else:
        assert 'test_acc1' in lines[0] and 'train_clip_loss' in lines[0]
        assert (tmp_path / 'checkpoint_best.pt').exists()
    ckpt = torch.load(tmp_path / 'checkpoint.pt', weights_only=True)  # plain types only
    assert ckpt['epoch'] == 2 and ckpt['args']['model'] == model
    assert all(k.startswith('module.') for k in ckpt['state_dict'])  # the original's DDP key layout
    assert os.listdir(tmp_path / 'tensorboard')


def test_device_augment_trains_with_exact_accumulation(tmp_path):
    stats = main_script.main(tiny_args(tmp_path, 'SLIP_TINY', '--device-augment', '--epochs', 1, '--batch-size', 4,
                                       '--update-freq', 2))
    assert stats['epoch'] == 0 and torch.isfinite(torch.tensor(stats['train_loss']))


def test_auto_resume_continues_after_last_epoch(tmp_path, caplog):
    main_script.main(tiny_args(tmp_path, 'CLIP_TINY', '--epochs', 1))
    before = _weights(tmp_path / 'checkpoint.pt')
    # a longer schedule is a change of the run: refused without --resume-override (tests/test_resume.py)
    stats = main_script.main(tiny_args(tmp_path, 'CLIP_TINY', '--epochs', 2, '--resume-override'))
    assert stats['epoch'] == 1  # only the second epoch ran
    lines = [json.loads(x) for x in (tmp_path / 'log.txt').read_text().splitlines()]
    assert [x['epoch'] for x in lines] == [0, 1]
    after = _weights(tmp_path / 'checkpoint.pt')
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_missing_eval_dataset_is_reported_and_training_continues(tmp_path):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    utils.logger.addHandler(handler)
    try:
        stats = main_script.main(tiny_args(tmp_path, 'CLIP_TINY', '--epochs', 1, '--eval-dataset', 'imagenet'))
    finally:
        utils.logger.removeHandler(handler)
    assert 'test_acc1' not in stats and 'train_loss' in stats
    assert any('zero-shot check disabled' in r.getMessage() for r in records)


def test_nonfinite_loss_every_step_stops_the_run(tmp_path, monkeypatch):
    import losses
    real = losses.CLIPLoss.forward

    def always_nan(self, outputs):
        out = real(self, outputs)
        out['loss'] = out['loss'] * float('nan')
        return out

    monkeypatch.setattr(losses.CLIPLoss, 'forward', always_nan)
    with pytest.raises(RuntimeError, match='3 consecutive steps with a non-finite loss'):
        main_script.main(tiny_args(tmp_path / 'b', 'CLIP_TINY', '--epochs', 1, '--max-nonfinite', 3))
    assert not (tmp_path / 'b' / 'checkpoint.pt').exists()


@pytest.mark.parametrize('model', ['CLIP_TINY', 'SLIP_TINY'])
def test_update_freq_trains_on_the_loss_of_one_big_batch(tmp_path, model):
    """--batch-size 4 --update-freq 2 logs the loss of --batch-size 8 (learning rate 0, so every step sees the same
    weights: the same 8 samples a step, the same loss), and the legacy flag the mean of two 4-sample losses."""
    frozen = ('--epochs', 1, '--lr', 0, '--lr-start', 0, '--lr-end', 0, '--wd', 0, '--eval-dataset', 'none')
    big = main_script.main(tiny_args(tmp_path / 'big', model, *frozen))
    accum = main_script.main(tiny_args(tmp_path / 'accum', model, *frozen, '--batch-size', 4, '--update-freq', 2))
    legacy = main_script.main(tiny_args(tmp_path / 'legacy', model, *frozen, '--batch-size', 4, '--update-freq', 2,
                                        '--legacy-update-freq'))
    assert accum['train_loss'] == pytest.approx(big['train_loss'], rel=1e-5)
    assert legacy['train_loss'] != pytest.approx(big['train_loss'], rel=1e-3)  # 4 negatives per sample, not 8


def test_update_freq_drops_the_micro_batches_that_cannot_fill_a_step(tmp_path):
    stats = main_script.main(tiny_args(tmp_path, 'CLIP_TINY', '--epochs', 1, '--batch-size', 4, '--update-freq', 3,
                                       '--print-freq', 1, '--eval-dataset', 'none'))
    lines = (tmp_path / 'log.txt').read_text().splitlines()
    assert len(lines) == 1 and stats['train_skipped_steps'] == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / 'tensorboard'))
    events.Reload()
    steps = [e.step for e in events.Scalars('train/loss')]
    assert steps == [1, 2, 3, 4, 5]  # 16 micro-batches of 4 -> 5 optimizer steps, one logging step each
    assert [e.step for e in events.Scalars('epoch/train_loss')] == [5]  # monotonic with the per-step logs


@pytest.mark.parametrize('precision,update_freq', [('fp32', 1), ('amp', 1), ('amp', 2)])
def test_nonfinite_losses_are_skipped_and_counted(tmp_path, monkeypatch, precision, update_freq):
    """Calls 2 and 3 of the loss are NaN: exactly those two steps are skipped, the weights stay finite (with exact
    accumulation the loss runs once per step, on the whole batch)."""
    import losses
    real = losses.CLIPLoss.forward
    calls = {'n': 0}

    def sometimes_nan(self, outputs):
        calls['n'] += 1
        out = real(self, outputs)
        if calls['n'] in (2, 3):
            out['loss'] = out['loss'] * float('nan')
        return out

    monkeypatch.setattr(losses.CLIPLoss, 'forward', sometimes_nan)
    stats = main_script.main(tiny_args(tmp_path, 'CLIP_TINY', '--epochs', 1, '--precision', precision,
                                       '--eval-dataset', 'none', '--batch-size', 8 // update_freq,
                                       '--update-freq', update_freq))
    assert calls['n'] == 8 and stats['train_skipped_steps'] == 2  # 64 samples / 8 = 8 steps
    ckpt = utils.load_checkpoint(str(tmp_path / 'checkpoint.pt'))
    assert all(torch.isfinite(v).all() for v in ckpt['state_dict'].values() if v.is_floating_point())
    if precision == 'amp':  # fp16 autocast with the loss scaler, whose state is checkpointed
        assert ckpt['scaler']['scale'] > 0 and ckpt['scaler']['_growth_tracker'] >= 0
    else:
        assert ckpt['scaler'] == {}


def test_compile_trains_a_few_steps(tmp_path, monkeypatch):
    """--compile: Dynamo captures every stage of the engine's step (the Batch input, the towers-only and replay
    passes of exact accumulation). The test compiles with the aot_eager backend: inductor's C++ code generation
    would take minutes on a 2-core machine and is torch's to test, not ours."""
    real_compile = torch.compile
    compiled = []

    def compile_aot_eager(model, **kw):
        compiled.append(model)
        return real_compile(model, backend='aot_eager', dynamic=True)

    monkeypatch.setattr(torch, 'compile', compile_aot_eager)
    common = ('--epochs', 1, '--demo-samples', 32, '--batch-size', 4, '--update-freq', 2, '--eval-dataset', 'none')
    stats = main_script.main(tiny_args(tmp_path, 'SLIP_TINY', *common, '--compile'))
    assert len(compiled) == 1 and stats['train_skipped_steps'] == 0
    eager = main_script.main(tiny_args(tmp_path / 'eager', 'SLIP_TINY', *common))
    assert stats['train_loss'] == pytest.approx(eager['train_loss'], rel=1e-4)  # the same training, compiled


def _run_cli(out, extra=(), env_extra=None):
    cmd = [sys.executable, 'main.py', '--dataset', 'demo', '--model', 'SLIP_TINY', '--demo-samples', 96,
           '--batch-size', 8, '--epochs', 2, '--workers', 0, '--precision', 'fp32', '--output-dir', out,
           '--save-every-steps', 1, '--print-freq', 100, '--eval-dataset', 'none', '--catalog', CATALOG, *extra]
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', **(env_extra or {}))
    return [str(c) for c in cmd], env


@pytest.mark.parametrize('update_freq', [1, 2])
def test_sigkill_and_restart_equals_uninterrupted_bitwise(tmp_path, update_freq, sigkill_and_rerun):
    extra = ['--update-freq', update_freq, '--batch-size', 8 // update_freq]  # the same global batch of 8
    cmd, env = _run_cli(tmp_path / 'ref', extra)
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    cmd, env = _run_cli(tmp_path / 'killed', extra)
    sigkill_and_rerun(cmd, env, tmp_path / 'killed' / 'checkpoint.pt', step=4)
    assert_same_weights(tmp_path / 'ref' / 'checkpoint.pt', tmp_path / 'killed' / 'checkpoint.pt')


@pytest.mark.dist
def test_torchrun_two_gloo_processes(tmp_path):
    out = tmp_path / 'ddp'
    cmd, env = _run_cli(out, extra=['--epochs', 1, '--save-every-steps', 0, '--eval-dataset', 'demo'])
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2'] + cmd[1:]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert 'global batch 16' in result.stdout + result.stderr
    lines = [json.loads(x) for x in (out / 'log.txt').read_text().splitlines()]
    assert len(lines) == 1 and 'test_acc1' in lines[0]
    assert utils.load_checkpoint(str(out / 'checkpoint.pt'))['epoch'] == 1


@pytest.mark.parametrize('norm', ['ln', 'none'])
def test_ssl_head_norm_option_trains_and_its_checkpoint_evaluates_and_exports(tmp_path, norm):
    import eval_zeroshot
    import export_open_clip
    stats = main_script.main(tiny_args(tmp_path, 'SLIP_TINY', '--epochs', 1, '--ssl-head-norm', norm,
                                       '--eval-dataset', 'none'))
    assert math.isfinite(stats['train_ssl_loss'])
    model, ckpt = eval_zeroshot.load_model(str(tmp_path / 'checkpoint.pt'), torch.device('cpu'))  # strict load
    head = {k for k in ckpt['state_dict'] if k.startswith('image_mlp.')}
    if norm == 'ln':
        assert {'image_mlp.bn1.weight', 'image_mlp.bn1.bias'} <= head and 'image_mlp.bn1.running_mean' not in head
        assert isinstance(model.image_mlp.bn1, torch.nn.LayerNorm)
    else:
        assert not any('.bn' in k for k in head) and isinstance(model.image_mlp.bn1, torch.nn.Identity)
    path = str(tmp_path / 'checkpoint.pt')
    exported, spec = export_open_clip.build_model(utils.load_checkpoint(path), path)  # strict against its keys
    assert spec.name == 'SLIP_TINY' and type(exported.image_mlp.bn1) is type(model.image_mlp.bn1)


def test_a_requeue_exit_mid_training_closes_the_tensorboard_thread(tmp_path, monkeypatch):
    """submitit requeues by raising SystemExit wherever training is; a TensorBoard writer thread left running then
    aborts the interpreter's exit ('terminate called without an active exception'), so main closes it on the way out."""
    import threading

    import engine as engine_lib

    def interrupted(engine, loader, epoch, first, iters, args, writer, *rest, **kw):
        writer.scalars({'probe': 1.0}, 0)  # the writer's thread is running when the signal comes
        raise SystemExit(-1)

    monkeypatch.setattr(engine_lib, 'train_one_epoch', interrupted)
    before = set(threading.enumerate())
    with pytest.raises(SystemExit):
        main_script.main(tiny_args(tmp_path, 'CLIP_TINY', '--epochs', 1))
    left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert left == []
