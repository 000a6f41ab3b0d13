"""Resume checks what it resumes: a checkpoint trained with other training-defining flags is refused, naming each
difference and the override flag, in main.py, main_linear.py and fine-tuning alike."""
import argparse
import logging
import shutil

import pytest
import torch

import main as main_script
import main_linear
import utils
from beit_finetuning import run_class_finetuning as rcf


def parse(module, *argv):
    parser = argparse.ArgumentParser(parents=[module.get_args_parser()])
    return parser.parse_args([str(a) for a in argv])


def demo_args(out, *extra):
    return parse(main_script, '--dataset', 'demo', '--model', 'CLIP_TINY', '--demo-samples', 16, '--batch-size', 8,
                 '--epochs', 1, '--warmup-epochs', 0, '--workers', 0, '--precision', 'fp32', '--eval-dataset', 'none',
                 '--output-dir', out, *extra)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A finished one-epoch CLIP_TINY run: its checkpoint.pt."""
    out = tmp_path_factory.mktemp('run')
    main_script.main(demo_args(out))
    return out / 'checkpoint.pt'


@pytest.fixture
def logs():
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    utils.logger.addHandler(handler)
    yield records
    utils.logger.removeHandler(handler)


def _copy(trained, tmp_path):
    shutil.copy(trained, tmp_path / 'checkpoint.pt')
    return tmp_path


@pytest.mark.parametrize('flag, value, old', [('--batch-size', 4, 8), ('--update-freq', 2, 1), ('--lr', 0.01, 0.003),
                                              ('--seed', 1, 0), ('--epochs', 3, 1), ('--demo-samples', 32, 16),
                                              ('--ssl-temp', 0.2, 0.1), ('--warmup-epochs', 1, 0)])
def test_main_refuses_a_checkpoint_with_other_training_flags(trained, tmp_path, flag, value, old):
    out = _copy(trained, tmp_path)
    with pytest.raises(SystemExit) as info:
        main_script.main(demo_args(out, flag, value))
    message = str(info.value)
    assert f'{flag}: checkpoint {old!r}, now {value!r}' in message and '--resume-override' in message
    assert message.count(': checkpoint ') == 1  # only that field differs


def test_main_names_every_differing_field_at_once(trained, tmp_path):
    out = _copy(trained, tmp_path)
    with pytest.raises(SystemExit) as info:
        main_script.main(demo_args(out, '--batch-size', 4, '--seed', 3))
    assert '--batch-size: checkpoint 8, now 4' in str(info.value) and '--seed: checkpoint 0, now 3' in str(info.value)


def test_main_refuses_another_world_size(trained, tmp_path):
    ckpt = torch.load(trained, weights_only=True)
    ckpt['args']['world_size'] = 2  # as if written by a 2-process run
    torch.save(ckpt, tmp_path / 'checkpoint.pt')
    with pytest.raises(SystemExit, match='--world-size: checkpoint 2, now 1'):
        main_script.main(demo_args(tmp_path))


def test_main_resume_override_continues_and_logs_the_change(trained, tmp_path, logs):
    out = _copy(trained, tmp_path)
    stats = main_script.main(demo_args(out, '--epochs', 2, '--resume-override'))
    assert stats['epoch'] == 1  # resumed after the stored epoch and trained the new one
    warnings = [r.getMessage() for r in logs if r.levelno == logging.WARNING]
    assert any('--resume-override' in m and '--epochs: checkpoint 1, now 2' in m for m in warnings)


def test_main_flags_that_do_not_change_training_may_differ(trained, tmp_path, logs):
    out = _copy(trained, tmp_path)
    main_script.main(demo_args(out, '--print-freq', 3, '--eval-freq', 5, '--save-every-steps', 7))
    assert any('resumed from' in r.getMessage() for r in logs)


def test_main_field_missing_from_an_old_checkpoint_is_logged_not_refused(trained, tmp_path, logs):
    ckpt = torch.load(trained, weights_only=True)
    del ckpt['args']['precision'], ckpt['args']['device_augment']  # released checkpoints predate these flags
    torch.save(ckpt, tmp_path / 'checkpoint.pt')
    main_script.main(demo_args(tmp_path))
    assert any('does not record precision, device_augment' in r.getMessage() for r in logs)


def test_main_evaluate_loads_a_checkpoint_of_any_settings(trained, tmp_path):
    stats = main_script.main(demo_args(tmp_path, '--evaluate', '--resume', trained, '--batch-size', 4,
                                       '--eval-dataset', 'demo'))
    assert set(stats) >= {'acc1', 'acc5'}


def test_linear_probe_refuses_other_settings(tmp_path):
    args = parse(main_linear, '--pretrained', 'slip.pt', '--output-dir', tmp_path, '--lr', 0.1)
    args.world_size = 1
    head = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(head.parameters(), 0.1)
    torch.save({'epoch': 2, 'state_dict': {f'head.{k}': v for k, v in head.state_dict().items()},
                'optimizer': optimizer.state_dict(), 'args': vars(args)}, tmp_path / 'linear_checkpoint.pt')
    args.lr, args.batch_size = 0.5, 64
    with pytest.raises(SystemExit, match=r'(?s)--batch-size: checkpoint 128, now 64.*--lr: checkpoint 0.1, now 0.5'
                                         r'.*--resume-override'):
        main_linear.resume(args, head, optimizer)
    args.resume_override = True
    main_linear.resume(args, head, optimizer)
    assert args.start_epoch == 2


def test_finetune_refuses_other_settings(tmp_path):
    path = tmp_path / 'checkpoint-last.pth'
    args = parse(rcf, '--resume', path, '--precision', 'fp32', '--device', 'cpu', '--layer_decay', 0.65)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    torch.save({'epoch': 0, 'state_dict': model.state_dict(), 'optimizer': optimizer.state_dict(),
                'scaler': {}, 'args': vars(args)}, path)
    args.layer_decay, args.mixup = 0.75, 0.8
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    with pytest.raises(SystemExit, match=r'(?s)--layer_decay: checkpoint 0.65, now 0.75.*--mixup.*--resume_override'):
        rcf.resume(args, model, optimizer, scaler, None)
    args.eval = True  # evaluation only loads weights: any settings
    assert rcf.resume(args, model, optimizer, scaler, None) == (1, 0.0)


def test_check_resume_args_compares_lists_and_tuples_by_value():
    stored, new = {'betas': [0.9, 0.98], 'lr': 1.0}, {'betas': (0.9, 0.98), 'lr': 1.0}
    assert utils.check_resume_args(stored, new, ('betas', 'lr', 'seed'), 'x.pt', False) == []
    with pytest.raises(SystemExit, match=r'--betas: checkpoint \[0.9, 0.98\], now \(0.9, 0.95\)'):
        utils.check_resume_args(stored, {**new, 'betas': (0.9, 0.95)}, ('betas',), 'x.pt', False)
