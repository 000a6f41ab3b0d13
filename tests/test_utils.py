"""Schedule, meters, AMP helpers, tokenizer and the checkpoint funnel."""
import argparse
import os
import pathlib
import pickle

import numpy as np
import pytest
import torch

import models
import utils


def test_cosine_schedule_shape_and_end_points():
    s = utils.cosine_scheduler(1.0, 0.1, epochs=3, niter_per_ep=10, warmup_epochs=1, start_warmup_value=0.0)
    assert len(s) == 30
    assert s[0] == 0.0 and s[9] == pytest.approx(1.0)  # warm-up reaches the peak at its last step
    assert s[10] == pytest.approx(1.0)  # and the cosine starts at the peak
    assert np.all(np.diff(s[10:]) <= 1e-12) and s[-1] > 0.1 and s[-1] == pytest.approx(0.1, abs=0.01)
    assert len(utils.cosine_scheduler(1.0, 0.0, 2, 5, warmup_epochs=0)) == 10


def test_meter_weighted_average_single_process():
    m = utils.AverageMeter()
    m.update(1.0, n=1)
    m.update(4.0, n=3)
    m.synchronize()  # no process group: unchanged
    assert m.avg == pytest.approx(13 / 4)
    logger = utils.MetricLogger()
    logger.update(n=2, loss=torch.tensor(0.5), acc=10)
    assert logger.averages() == {'loss': 0.5, 'acc': 10.0}


def test_accuracy_topk():
    out = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5]])
    top1, top2 = utils.accuracy(out, torch.tensor([1, 1, 0]), topk=(1, 2))
    assert top1 == pytest.approx(100 / 3) and top2 == pytest.approx(200 / 3)


def test_precision_helpers():
    cpu = torch.device('cpu')
    assert not utils.grad_scaler('amp_bf16', cpu).is_enabled()
    assert utils.grad_scaler('amp', cpu).is_enabled()
    x = torch.randn(4, 4)
    with utils.autocast('amp_bf16', cpu):
        assert (x @ x).dtype == torch.bfloat16
    with utils.autocast('fp32', cpu):
        assert (x @ x).dtype == torch.float32


def test_tokenizer_ids_and_truncation():
    tok = utils.Tokenizer()
    ids = tok('a photo of a dog.')
    assert ids.shape == (77,) and ids.dtype == torch.long
    assert ids[:8].tolist() == [49406, 320, 1125, 539, 320, 1929, 269, 49407]
    assert ids[8:].eq(0).all()
    long = tok(['dog ' * 200, 'short'])
    assert long.shape == (2, 77)
    assert long[0, 76].item() == 49407  # over-long captions keep end-of-text at the last position
    assert long[0].argmax().item() == 76


def _model_state():
    torch.manual_seed(0)
    return models.create_model('CLIP_TINY').state_dict()


def test_checkpoint_round_trip_is_weights_only(tmp_path):
    state = _model_state()
    args = argparse.Namespace(model='CLIP_TINY', output_dir=pathlib.Path(tmp_path), betas=(0.9, 0.98))
    utils.save_checkpoint({'epoch': 3, 'state_dict': state, 'optimizer': {}, 'scaler': {}, 'best_acc1': 12.5,
                           'args': args}, is_best=True, output_dir=str(tmp_path))
    for name in ('checkpoint.pt', 'checkpoint_best.pt'):
        raw = torch.load(tmp_path / name, weights_only=True)  # plain types only: loads without any allow-list
        assert set(raw) == {'epoch', 'state_dict', 'optimizer', 'scaler', 'best_acc1', 'args'}
        assert raw['args'] == {'model': 'CLIP_TINY', 'output_dir': str(tmp_path), 'betas': (0.9, 0.98)}
    ckpt = utils.load_checkpoint(str(tmp_path / 'checkpoint.pt'))
    assert ckpt['epoch'] == 3 and ckpt['best_acc1'] == 12.5
    for k, v in state.items():
        assert torch.equal(ckpt['state_dict'][k], v)
    assert not [f for f in os.listdir(tmp_path) if '.tmp' in f]  # no temporary files left behind


def test_released_format_loads_without_unpickling_code(tmp_path):
    state = {'module.' + k: v for k, v in _model_state().items()}
    args = argparse.Namespace(model='CLIP_SIMCLR_VITB16', ssl_mlp_dim=4096, output_dir=pathlib.PosixPath('/ckpt/1'))
    torch.save({'epoch': 25, 'state_dict': state, 'best_acc1': 42.8, 'args': args}, tmp_path / 'slip.pt')
    ckpt = utils.load_checkpoint(str(tmp_path / 'slip.pt'))
    assert ckpt['args']['model'] == 'SLIP_VITB16'
    assert ckpt['args']['output_dir'] == '/ckpt/1'
    assert not any(k.startswith('module.') for k in ckpt['state_dict'])


class Evil:
    def __reduce__(self):
        return (os.system, ('echo pwned',))


def test_arbitrary_objects_are_refused(tmp_path):
    path = tmp_path / 'evil.pt'
    torch.save({'state_dict': {}, 'args': Evil()}, path)
    with pytest.raises(utils.CheckpointError, match='evil.pt'):
        utils.load_checkpoint(str(path))


def test_truncated_and_foreign_files_give_clear_errors(tmp_path):
    utils.save_checkpoint({'epoch': 1, 'state_dict': _model_state()}, False, str(tmp_path))
    data = (tmp_path / 'checkpoint.pt').read_bytes()
    (tmp_path / 'cut.pt').write_bytes(data[: len(data) // 2])
    with pytest.raises(utils.CheckpointError, match='cut.pt.*truncated'):
        utils.load_checkpoint(str(tmp_path / 'cut.pt'))
    (tmp_path / 'notes.pt').write_text('hello')
    with pytest.raises(utils.CheckpointError, match='notes.pt'):
        utils.load_checkpoint(str(tmp_path / 'notes.pt'))
    with pytest.raises(utils.CheckpointError, match='does not exist'):
        utils.load_checkpoint(str(tmp_path / 'missing.pt'))
    (tmp_path / 'list.pt').write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(utils.CheckpointError, match='list.pt'):
        utils.load_checkpoint(str(tmp_path / 'list.pt'))


def test_model_mismatch_names_keys(tmp_path):
    state = _model_state()
    del state['logit_scale']
    state['extra.weight'] = torch.zeros(1)
    with pytest.raises(utils.CheckpointError, match=r"x.pt.*logit_scale.*extra.weight"):
        utils.load_state_dict_checked(models.create_model('CLIP_TINY'), state, 'x.pt')


def test_save_killed_midway_keeps_previous_file(tmp_path, monkeypatch):
    utils.save_checkpoint({'epoch': 1, 'state_dict': _model_state()}, False, str(tmp_path))
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        f.write(b'partial bytes')
        raise KeyboardInterrupt  # as if the process were killed during the write

    monkeypatch.setattr(torch, 'save', dying_save)
    with pytest.raises(KeyboardInterrupt):
        utils.save_checkpoint({'epoch': 2, 'state_dict': _model_state()}, False, str(tmp_path))
    monkeypatch.setattr(torch, 'save', real_save)
    assert utils.load_checkpoint(str(tmp_path / 'checkpoint.pt'))['epoch'] == 1


def test_legacy_checkpoint_with_numpy_scalars_loads_through_the_public_allow_list(tmp_path):
    path = tmp_path / 'legacy.pt'
    torch.save({'state_dict': {'w': torch.ones(1)}, 'best_acc1': np.float64(42.5),
                'args': argparse.Namespace(lr=np.float64(0.5), model='SLIP_VITB16')}, path)  # as numpy-era runs saved
    ckpt = utils.load_checkpoint(str(path))
    assert ckpt['best_acc1'] == 42.5 and ckpt['args'] == {'lr': 0.5, 'model': 'SLIP_VITB16'}
    assert utils.NUMPY_SCALAR is np.float64(1).__reduce__()[0]  # what numpy pickles scalars with, not a private path


@pytest.mark.parametrize('cores, expected', [(1, 1), (2, 2), (8, 8), (64, 10)])
def test_default_workers_follow_the_machine_up_to_ten(monkeypatch, cores, expected):
    import eval_zeroshot
    import main_linear
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(cores)))
    assert utils.default_workers() == expected
    for module in (eval_zeroshot, main_linear):
        assert module.get_args_parser().parse_args([]).workers == expected
