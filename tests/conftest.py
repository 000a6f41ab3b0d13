import argparse
import io
import json
import os
import pathlib

import pytest

# Tests never touch the network.
os.environ.setdefault('HF_HUB_OFFLINE', '1')
# One intra-op thread: tiny models gain nothing from two, and two threads thrash when the other core is busy.
os.environ.setdefault('OMP_NUM_THREADS', '1')


# ----------------------------------------------------------------------------------------------------------------
# Shared fixtures (issue 12): tokenizer, released-format checkpoints, COCO pre-training folders, a small catalog
# (torch and the project modules are imported inside them: the variables above must be set before torch loads)
# ----------------------------------------------------------------------------------------------------------------
REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope='session')
def tokenizer():
    """The real CLIP BPE tokenizer (open_clip ships the vocabulary: no download)."""
    import utils
    return utils.Tokenizer()


def write_released_checkpoint(path, name='SLIP_TINY', seed=0, namespace=True, **extra_args):
    """A checkpoint laid out as the original main.py wrote it: DDP ``module.`` keys, and ``args`` as an
    argparse.Namespace (with a PosixPath, as submitit runs stored) or, with ``namespace=False``, a plain dict.
    Returns the model (seeded with ``seed``) whose weights it holds."""
    import torch

    import models
    torch.manual_seed(seed)
    model = models.create_model(models.resolve_name(name))
    args = dict(model=name, ssl_mlp_dim=256, ssl_emb_dim=64, **extra_args)
    if namespace:
        args = argparse.Namespace(output_dir=pathlib.PosixPath('/ckpt/x'), **args)
    torch.save({'epoch': 25, 'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()},
                'optimizer': {}, 'best_acc1': 12.5, 'args': args}, path)
    return model


@pytest.fixture(scope='session')
def released_checkpoint():
    """``released_checkpoint(path, name='SLIP_TINY', seed=0, namespace=True)`` writes a released-format file."""
    return write_released_checkpoint


def _write_coco(root, images, annotations):
    """A COCO-format pre-training set: ``images`` maps image id -> (width, height, (r, g, b)) JPEGs in
    ``root/train2017``; ``annotations`` is a list of (image id, caption). Returns the captions json path."""
    from PIL import Image
    root = pathlib.Path(root)
    (root / 'train2017').mkdir(parents=True, exist_ok=True)
    for image_id, (w, h, color) in images.items():
        buf = io.BytesIO()
        Image.new('RGB', (w, h), color).save(buf, format='JPEG')
        (root / 'train2017' / f'{image_id:012d}.jpg').write_bytes(buf.getvalue())
    meta = root / 'captions_train2017.json'
    meta.write_text(json.dumps({'images': [], 'annotations': [{'image_id': i, 'caption': c} for i, c in annotations]}))
    return str(meta)


@pytest.fixture(scope='session')
def write_coco():
    """``write_coco(root, {image_id: (w, h, rgb)}, [(image_id, caption), ...])`` -> captions json path."""
    return _write_coco


@pytest.fixture(scope='session')
def small_catalog(tmp_path_factory):
    """The project's dataset_catalog.json with a 64-image demo zero-shot set (fast per-epoch checks), in pytest's
    temporary folder so that nothing is left behind."""
    catalog = json.loads((REPO / 'dataset_catalog.json').read_text())
    catalog['demo']['size'] = 64
    path = tmp_path_factory.mktemp('catalog') / 'dataset_catalog.json'
    path.write_text(json.dumps(catalog))
    return str(path)


# ----------------------------------------------------------------------------------------------------------------
# Kill-and-resume: a main.py command SIGKILLed mid-epoch, then run again to the end
# ----------------------------------------------------------------------------------------------------------------
# Run in place of ``python main.py ...``: main.py with a SIGKILL right after the checkpoint of a given step of the
# first epoch is written (verified and linked as checkpoint.pt, in the background writer when saves are async), so
# the kill falls at a known step however fast or slow the machine is.
_KILL_AFTER_SAVE = """
import os, runpy, signal, sys
sys.path.insert(0, os.getcwd())
import checkpoints
_commit, _step = checkpoints.CheckpointManager.commit, int(os.environ['SLIP_TEST_KILL_AT_STEP'])
def commit_then_die(self, state, *args, **kwargs):
    _commit(self, state, *args, **kwargs)
    if state.get('epoch') == 0 and state.get('step') == _step:
        os.kill(os.getpid(), signal.SIGKILL)
checkpoints.CheckpointManager.commit = commit_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


@pytest.fixture
def sigkill_and_rerun():
    """``run(cmd, env, ckpt, step, self_killing=False, between=None)``: ``cmd`` is a ``python main.py ...`` command
    line that checkpoints every step to ``ckpt``. It runs with a SIGKILL right after the checkpoint of ``step`` steps
    of the first epoch (``self_killing``: the command kills itself, with --inject-fault kill-during-save, and ``ckpt``
    must then hold ``step`` steps), ``between()`` looks at what the kill left, then it runs again, unchanged, to the
    end; returns the checkpoint it was killed at."""
    import subprocess

    import utils

    def run(cmd, env, ckpt, step, self_killing=False, between=None):
        killer = [] if self_killing else ['-c', _KILL_AFTER_SAVE]
        killed = subprocess.run([cmd[0], *killer, *cmd[1:]], cwd=REPO,
                                env=dict(env, SLIP_TEST_KILL_AT_STEP=str(step)), capture_output=True)
        assert killed.returncode == -9, killed.stderr.decode()[-2000:]  # died by SIGKILL, not by an error
        killed_at = utils.load_checkpoint(str(ckpt))
        assert (killed_at['epoch'], killed_at['step']) == (0, step)  # mid-epoch, where it was killed
        if between is not None:
            between()
        rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True)
        assert rerun.returncode == 0, rerun.stderr.decode()[-3000:]  # the rerun's own error, if any
        return killed_at
    return run


def assert_same_weights(path_a, path_b):
    """The two checkpoints' weights are bitwise equal."""
    import torch

    import utils
    a, b = utils.load_checkpoint(str(path_a))['state_dict'], utils.load_checkpoint(str(path_b))['state_dict']
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------------------------------------------
# Real process groups: a function run in 2 processes joined by gloo (tests/test_dist.py, tests/test_engine.py)
# ----------------------------------------------------------------------------------------------------------------
def _gloo_worker(rank, world_size, init_file, result_dir, fn, args):
    """One process of ``gloo_run``: joins the group, runs ``fn(rank, world_size, *args)`` and saves its result."""
    import torch
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world_size)
    try:
        torch.save(fn(rank, world_size, *args), os.path.join(result_dir, f'rank{rank}.pt'))
        dist.barrier()  # no rank tears the group down while another still talks to it
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope='session')
def gloo_run(tmp_path_factory):
    """``gloo_run(fn, *args, world_size=2)`` runs ``fn(rank, world_size, *args)`` in ``world_size`` real processes
    joined in a gloo process group (initialised before and destroyed after ``fn``) and returns their results, by rank.
    ``fn`` is a module-level function (the processes are spawned); its result is made of tensors, numbers, strings,
    lists, tuples and dicts (it travels through ``torch.save`` and ``torch.load(weights_only=True)``)."""
    import torch
    import torch.multiprocessing as mp

    def run(fn, *args, world_size=2):
        tmp = tmp_path_factory.mktemp('gloo')
        mp.spawn(_gloo_worker, args=(world_size, str(tmp / 'init'), str(tmp), fn, args), nprocs=world_size, join=True)
        return [torch.load(tmp / f'rank{rank}.pt', weights_only=True) for rank in range(world_size)]
    return run


# ----------------------------------------------------------------------------------------------------------------
# Host reads of device values (tests/test_compile.py, tests/test_engine.py)
# ----------------------------------------------------------------------------------------------------------------
READ_CALLS = [('Tensor', n) for n in ('item', 'tolist', 'nonzero', 'numpy', 'argwhere', 'masked_select', 'unique',
                                      '__int__', '__float__', '__bool__', '__index__')] + \
             [('torch', n) for n in ('nonzero', 'argwhere', 'masked_select', 'unique')]


@pytest.fixture
def count_reads(monkeypatch):
    """``with count_reads() as calls:`` lists, in order, every call in the block that reads a tensor's value on the
    host or gives a shape that depends on one (``READ_CALLS``, patched on torch and torch.Tensor)."""
    import contextlib

    import torch

    @contextlib.contextmanager
    def counting():
        calls = []

        def wrap(name, fn):
            def counted(*args, **kwargs):
                calls.append(name)
                return fn(*args, **kwargs)
            return counted

        patch = pytest.MonkeyPatch()
        for owner, name in READ_CALLS:
            owner = torch.Tensor if owner == 'Tensor' else torch
            patch.setattr(owner, name, wrap(name, getattr(owner, name)))
        try:
            yield calls
        finally:
            patch.undo()
    return counting
