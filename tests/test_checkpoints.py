"""checkpoints.py: the one atomic writer, and background saves from host buffers reserved once (issue 25)."""
import ast
import os
import pathlib
import threading

import pytest
import torch

import checkpoints
import models

REPO = pathlib.Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------------------------
# atomic_write
# ----------------------------------------------------------------------------------------------------------------
def test_atomic_write_keeps_the_old_file_and_leaves_no_temporary_file_when_the_writer_raises(tmp_path):
    target = tmp_path / 'data.bin'
    target.write_bytes(b'old complete version')
    seen = []
    with pytest.raises(RuntimeError, match='writer failed'):
        with checkpoints.atomic_write(str(target)) as f:
            seen.append(f.name)
            f.write(b'new, partial')
            raise RuntimeError('writer failed')
    assert target.read_bytes() == b'old complete version'
    assert os.listdir(tmp_path) == ['data.bin']
    assert os.path.dirname(seen[0]) == str(tmp_path) and os.path.basename(seen[0]).startswith('data.bin.tmp.')


def test_atomic_write_replaces_the_file_and_link_names_the_same_bytes(tmp_path):
    target = tmp_path / 'config.json'
    target.write_text('old')
    with checkpoints.atomic_write(str(target), text=True) as f:
        f.write('{"new": 1}')
    checkpoints.link(str(target), str(tmp_path / 'alias.json'))
    assert target.read_text() == '{"new": 1}' and os.path.samefile(target, tmp_path / 'alias.json')
    assert sorted(os.listdir(tmp_path)) == ['alias.json', 'config.json']


def test_concurrent_writers_never_share_a_temporary_file_and_the_target_is_one_complete_version(tmp_path):
    target = str(tmp_path / 'shared.bin')
    writers, size = 8, 1 << 20
    versions = [bytes([i]) * size for i in range(writers)]
    names, errors = [], []
    start = threading.Barrier(writers)

    def write(i):
        try:
            start.wait()
            with checkpoints.atomic_write(target) as f:
                names.append(f.name)
                for k in range(0, size, 1 << 16):  # in pieces: the writers interleave
                    f.write(versions[i][k:k + (1 << 16)])
        except BaseException as e:  # noqa: BLE001 (reported below, in the test's thread)
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(names)) == writers  # every writer had its own temporary file
    with open(target, 'rb') as f:
        assert f.read() in versions
    assert os.listdir(tmp_path) == ['shared.bin']


def _renames(path: pathlib.Path):
    """(function, line) of every os.replace / os.rename call in the file, ``function`` the one it is in."""
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            f = getattr(child, 'func', None)
            if isinstance(child, ast.Call) and isinstance(f, ast.Attribute) and f.attr in ('replace', 'rename') \
                    and isinstance(f.value, ast.Name) and f.value.id == 'os':
                found.append((function, child.lineno))
            visit(child, inner)
    visit(ast.parse(path.read_text(), str(path)), None)
    return found


def test_the_project_renames_a_file_into_place_in_one_place_only_atomic_write():
    calls = [(str(p.relative_to(REPO)), *call) for p in sorted(REPO.rglob('*.py'))
             if not {'tests', '.venv', '.git'} & set(p.relative_to(REPO).parts[:-1]) for call in _renames(p)]
    assert [c[:2] for c in calls] == [('checkpoints.py', 'atomic_write')], calls


# ----------------------------------------------------------------------------------------------------------------
# Background saves: buffers reserved once, the values of the moment of the save
# ----------------------------------------------------------------------------------------------------------------
def _training():
    """CLIP_TINY and its AdamW (not stepped yet, as when main.py reserves), and a step that changes every tensor."""
    torch.manual_seed(0)
    model = models.create_model('CLIP_TINY')
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        optimizer.step()

    def state(n):
        return {'epoch': 0, 'step': n, 'state_dict': model.state_dict(), 'optimizer': optimizer.state_dict()}
    return model, optimizer, step, state


def _flat(obj, prefix=''):
    """Every leaf of a nested checkpoint as (path, value)."""
    if isinstance(obj, dict):
        return [x for k, v in obj.items() for x in _flat(v, f'{prefix}/{k}')]
    if isinstance(obj, (list, tuple)):
        return [x for i, v in enumerate(obj) for x in _flat(v, f'{prefix}/{i}')]
    return [(prefix, obj)]


def _assert_same_checkpoint(path_a, path_b):
    a = _flat(torch.load(path_a, weights_only=True))
    b = _flat(torch.load(path_b, weights_only=True))
    assert [k for k, _ in a] == [k for k, _ in b]
    for (k, x), (_, y) in zip(a, b, strict=True):
        assert torch.equal(x, y) if torch.is_tensor(x) else x == y, k


@pytest.fixture
def held_writes(monkeypatch):
    """Background writes wait for ``release.set()``; ``written`` gets the tensors each write was handed."""
    release, written = threading.Event(), []
    real = checkpoints.write_verified

    def held(state, path, kill_after=None):
        written.append([v for _, v in _flat(state) if torch.is_tensor(v)])
        if threading.current_thread().name == 'checkpoint-writer':
            assert release.wait(30)
        return real(state, path, kill_after)
    monkeypatch.setattr(checkpoints, 'write_verified', held)
    return release, written


def test_reserved_host_buffers_are_allocated_before_the_first_step_and_reused_by_every_save(tmp_path, held_writes):
    release, written = held_writes
    release.set()
    model, optimizer, step, state = _training()
    manager = checkpoints.CheckpointManager(str(tmp_path), keep=1)
    manager.reserve(checkpoints.state_like(model, optimizer))
    reserved = {b.data_ptr() for b in manager.host_buffers()}
    tensors = len(model.state_dict()) + 3 * len(list(model.parameters()))  # AdamW: step, exp_avg, exp_avg_sq
    assert len(reserved) == tensors
    for n in range(3):
        step()
        manager.save(state(n))
        manager.wait()
    assert [len(w) for w in written] == [tensors] * 3
    assert [{t.data_ptr() for t in w} for w in written] == [reserved] * 3  # the same buffers, every save
    assert {b.data_ptr() for b in manager.host_buffers()} == reserved  # and no other was allocated
    manager.close()


def test_async_saves_equal_synchronous_ones_bitwise_while_training_changes_the_model(tmp_path, held_writes):
    """Each background write is held until training has stepped again: the file still holds the values of the moment
    of its save, bitwise those a synchronous save wrote then, not the previous save's nor later ones."""
    release, _ = held_writes
    model, optimizer, step, state = _training()
    background = checkpoints.CheckpointManager(str(tmp_path / 'async'), keep=3)
    background.reserve(checkpoints.state_like(model, optimizer))
    now = checkpoints.CheckpointManager(str(tmp_path / 'sync'), keep=3, async_save=False)
    for n in range(2):
        step()
        now.save(state(n))
        background.save(state(n))
        step()  # training goes on while the write is held
        release.set()
        background.wait()
        release.clear()
    background.close()
    for n in range(2):
        name = f'checkpoint_e0_s{n}.pt'
        _assert_same_checkpoint(tmp_path / 'async' / name, tmp_path / 'sync' / name)
    first = torch.load(tmp_path / 'async' / 'checkpoint_e0_s0.pt', weights_only=True)['state_dict']
    second = torch.load(tmp_path / 'async' / 'checkpoint_e0_s1.pt', weights_only=True)['state_dict']
    assert not torch.equal(first['logit_scale'], second['logit_scale'])  # the second save saw the model change
    assert not torch.equal(second['logit_scale'], model.state_dict()['logit_scale'])  # and not what came after


def test_bench_save_times_the_chosen_modes_only_and_summarizes_the_saves_after_the_first(tmp_path):
    import argparse

    import bench_save
    args = bench_save.get_args_parser().parse_args(['--model', 'CLIP_TINY', '--saves', '3', '--modes', 'async',
                                                    '--output-dir', str(tmp_path)])
    assert args.modes == ('async',)
    rows = bench_save.bench_save(args)
    assert [(r['mode'], r['save']) for r in rows] == [('async', 0), ('async', 1), ('async', 2)]
    summary = bench_save.summarize(rows)
    steady = sorted(r['stall_s'] for r in rows[1:])
    assert list(summary) == ['async'] and summary['async']['stall_s'] == (steady[0] + steady[1]) / 2
    assert summary['async']['saves'] == 2
    with pytest.raises(SystemExit):
        argparse.ArgumentParser(parents=[bench_save.get_args_parser()]).parse_args(['--modes', 'async,fast'])
