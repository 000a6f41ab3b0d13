"""main.py end to end on the generated demo data: every family, resume, kill-and-resume, 2 gloo processes, guards."""
import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import main as main_script
import utils

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


def test_device_augment_trains(tmp_path):
    stats = main_script.main(tiny_args(tmp_path, 'SLIP_TINY', '--device-augment', '--epochs', 1))
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


def test_nonfinite_loss_skips_steps_then_stops(tmp_path, monkeypatch):
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
    main_script.main(tiny_args(tmp_path / 'a', 'CLIP_TINY', '--epochs', 1))
    state = _weights(tmp_path / 'a' / 'checkpoint.pt')
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())

    def always_nan(self, outputs):
        out = real(self, outputs)
        out['loss'] = out['loss'] * float('nan')
        return out

    monkeypatch.setattr(losses.CLIPLoss, 'forward', always_nan)
    with pytest.raises(RuntimeError, match='consecutive steps with a non-finite loss'):
        main_script.main(tiny_args(tmp_path / 'b', 'CLIP_TINY', '--epochs', 1, '--max-nonfinite', 3))
    assert not (tmp_path / 'b' / 'checkpoint.pt').exists()


def test_update_freq_matches_one_big_batch_for_clip(tmp_path):
    """Accumulating 2 x 4 gives the same first-epoch loss curve length and a valid schedule (no overflow)."""
    stats = main_script.main(tiny_args(tmp_path, 'CLIP_TINY', '--epochs', 1, '--batch-size', 4,
                                       '--update-freq', 3))  # 16 batches of 4 -> 5 optimizer steps
    assert stats['epoch'] == 0 and stats['train_loss'] > 0


def _run_cli(out, extra=(), env_extra=None):
    cmd = [sys.executable, 'main.py', '--dataset', 'demo', '--model', 'SLIP_TINY', '--demo-samples', 96,
           '--batch-size', 8, '--epochs', 2, '--workers', 0, '--precision', 'fp32', '--output-dir', out,
           '--save-every-steps', 1, '--print-freq', 100, '--eval-dataset', 'none', '--catalog', CATALOG, *extra]
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', **(env_extra or {}))
    return [str(c) for c in cmd], env


def test_sigkill_and_restart_equals_uninterrupted_bitwise(tmp_path):
    cmd, env = _run_cli(tmp_path / 'ref')
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    cmd, env = _run_cli(tmp_path / 'killed')
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / 'killed' / 'checkpoint.pt'
    deadline = time.time() + 120
    while time.time() < deadline:  # kill in the middle of the first epoch, after a few mid-epoch checkpoints
        if ckpt.exists() and utils.load_checkpoint(str(ckpt)).get('step', 0) >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert utils.load_checkpoint(str(ckpt))['epoch'] == 0  # really killed mid-epoch
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    ref, resumed = _weights(tmp_path / 'ref' / 'checkpoint.pt'), _weights(ckpt)
    assert ref.keys() == resumed.keys()
    for k in ref:
        assert torch.equal(ref[k], resumed[k]), k


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
