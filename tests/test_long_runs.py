"""Long runs (issue 19): divergence rollback, kept checkpoints, async saves, fault injection.

The end-to-end runs train CLIP_TINY on 64 demo samples, 8 optimizer steps of 8 per epoch, 2 epochs (global steps
0-15), checkpointing every step, with a guard window of 4 steps so that it decides from step 4 on.
"""
import argparse
import json
import os
import signal
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import checkpoints
import engine as engine_lib
import guard
import main as main_script
import utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULT = ('--allow-fault-injection', '--inject-fault')


def run_args(out, *extra, samples=64, epochs=2):
    parser = argparse.ArgumentParser(parents=[main_script.get_args_parser()])
    argv = ['--dataset', 'demo', '--model', 'CLIP_TINY', '--demo-samples', samples, '--batch-size', 8, '--epochs',
            epochs, '--warmup-epochs', 1, '--lr', 1e-3, '--workers', 0, '--precision', 'fp32', '--eval-dataset',
            'none', '--print-freq', 100, '--save-every-steps', 1, '--keep-checkpoints', 20, '--guard-window', 4,
            '--output-dir', out, *extra]
    return parser.parse_args([str(a) for a in argv])


def every_tensor(path):
    """A checkpoint's weights and optimizer state, flat: what 'bitwise the same run' compares."""
    ckpt = utils.load_checkpoint(str(path))
    tensors = {f'model.{k}': v for k, v in ckpt['state_dict'].items()}
    for i, state in ckpt['optimizer']['state'].items():
        tensors.update({f'optimizer.{i}.{k}': v for k, v in state.items()})
    return tensors


def assert_bitwise_equal(path_a, path_b):
    a, b = every_tensor(path_a), every_tensor(path_b)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def log_lines(out):
    return [json.loads(x) for x in (out / 'log.txt').read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------------------
# Rollback, end to end
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('compiled', [False, True])
def test_injected_spike_rolls_back_and_ends_bitwise_equal_to_a_resume_with_the_same_skip_list(tmp_path, compiled):
    """A spike at steps 10-12 (epoch 1 steps 2-4) rolls back to the checkpoint after step 8 (at or before step 9,
    whose update the first high loss measured) and skips epoch 1 steps 1-4. A clean run's checkpoint of that
    position, given the same skip list and resumed, ends with bitwise the same weights and optimizer state. Also
    with --compile (the 'eager' backend: dynamo's whole graphs without code generation, quick on the CPU)."""
    spiked, clean, resumed = tmp_path / 'spiked', tmp_path / 'clean', tmp_path / 'resumed'
    compile_args = ['--compile', '--compile-backend', 'eager'] if compiled else []

    def args(out, *extra):  # every run of this test compiles, or none does
        return run_args(out, *compile_args, *extra)

    stats = main_script.main(args(spiked, *FAULT, 'loss-spike@10'))
    ckpt = utils.load_checkpoint(str(spiked / 'checkpoint.pt'))
    assert ckpt['skip_steps'] == [[1, 1, 4]] and stats['rollbacks'] == 1 and stats['train_discarded_steps'] == 4
    (record,) = ckpt['rollbacks']
    assert (record['first'], record['last'], record['to']) == (10, 12, [1, 1])
    (logged,) = [x['rollback'] for x in log_lines(spiked) if 'rollback' in x]  # the log records it too
    assert logged['skip_steps'] == [[1, 1, 4]] and logged['reload_seconds'] >= 0
    assert main_script.main(args(clean))['rollbacks'] == 0  # no false alarm on the clean run
    # the rolled-back run reloaded exactly the clean run's state at that position
    assert_bitwise_equal(spiked / 'checkpoint_e1_s1.pt', clean / 'checkpoint_e1_s1.pt')
    state = torch.load(clean / 'checkpoint_e1_s1.pt', weights_only=True)
    state['skip_steps'] = ckpt['skip_steps']
    resumed.mkdir()
    torch.save(state, resumed / 'checkpoint.pt')
    main_script.main(args(resumed))
    assert_bitwise_equal(spiked / 'checkpoint.pt', resumed / 'checkpoint.pt')
    final, clean_final = every_tensor(spiked / 'checkpoint.pt'), every_tensor(clean / 'checkpoint.pt')
    assert any(not torch.equal(final[k], clean_final[k]) for k in final)  # the skipped steps did change the run
    # the abandoned branch's checkpoints (epoch 1 steps 2-4) are gone; skipped steps save nothing
    kept = [f[:2] for f in checkpoints.CheckpointManager(str(spiked)).kept() if f[0] >= 1]
    assert kept == [(1, 0), (1, 1), (1, 6), (1, 7), (2, 0)]


def test_repeated_spikes_stop_after_max_rollbacks_naming_the_steps(tmp_path):
    faults = 'loss-spike@10,loss-spike@13'  # the second comes right after the first one's skipped window
    with pytest.raises(SystemExit) as info:
        main_script.main(run_args(tmp_path, *FAULT, faults, '--max-rollbacks', 1))
    message = str(info.value)
    assert 'at steps 13-15, after 1 rollbacks (--max-rollbacks 1)' in message
    assert 'rolled back: loss above the guard\'s threshold for 3 steps at steps 10-12' in message
    assert utils.load_checkpoint(str(tmp_path / 'checkpoint.pt'))['skip_steps'] == [[1, 1, 4]]


def test_nan_injection_counts_toward_max_nonfinite_and_rolls_back(tmp_path):
    stats = main_script.main(run_args(tmp_path / 'guarded', *FAULT, 'nan@10', '--max-nonfinite', 2))
    ckpt = utils.load_checkpoint(str(tmp_path / 'guarded' / 'checkpoint.pt'))
    (record,) = ckpt['rollbacks']
    assert record['reason'] == '2 non-finite losses in a row' and (record['first'], record['last']) == (10, 11)
    assert ckpt['skip_steps'] == [[1, 1, 3]] and stats['rollbacks'] == 1
    assert all(torch.isfinite(v).all() for v in ckpt['state_dict'].values() if v.is_floating_point())
    with pytest.raises(RuntimeError, match='2 consecutive steps with a non-finite loss'):  # without the guard: stop
        main_script.main(run_args(tmp_path / 'unguarded', *FAULT, 'nan@10', '--max-nonfinite', 2,
                                  '--no-divergence-guard'))


def test_a_single_nan_is_skipped_and_counted_without_rollback(tmp_path):
    stats = main_script.main(run_args(tmp_path, *FAULT, 'nan@9:1', '--epochs', 2))
    assert stats['train_skipped_steps'] == 1 and stats['rollbacks'] == 0


# ----------------------------------------------------------------------------------------------------------------
# Kept checkpoints and async saves
# ----------------------------------------------------------------------------------------------------------------
def test_keeps_the_last_k_checkpoints_and_every_nth_epoch_and_checkpoint_pt_is_the_newest(tmp_path):
    main_script.main(run_args(tmp_path, '--keep-checkpoints', 3, '--save-every-epochs', 2, samples=32, epochs=3))
    kept = checkpoints.CheckpointManager(str(tmp_path)).kept()  # 12 saves: 3 epochs x (3 mid-epoch + 1 at the end)
    assert [f[:2] for f in kept] == [(2, 0), (2, 2), (2, 3), (3, 0)]
    assert os.path.samefile(tmp_path / 'checkpoint.pt', kept[-1][2])  # a hard link: no second copy on disk
    assert torch.load(tmp_path / 'checkpoint.pt', weights_only=True)['epoch'] == 3
    assert not [n for n in os.listdir(tmp_path) if '.tmp.' in n]


def _state(value):
    return {'epoch': 0, 'step': value, 'state_dict': {'w': torch.full((64, 64), float(value))}, 'args': {}}


@pytest.mark.parametrize('async_save', [True, False])
def test_manager_never_leaves_zero_usable_checkpoints_and_deletes_only_after_verifying(tmp_path, monkeypatch,
                                                                                       async_save):
    manager = checkpoints.CheckpointManager(str(tmp_path), keep=1, async_save=async_save)
    real_verify = checkpoints.verify
    seen = []

    def verify_and_look(path, size, sha):  # between the write and the rename: the previous one must be there
        seen.append([f[1] for f in manager.kept()])
        assert utils.load_checkpoint(str(tmp_path / 'checkpoint.pt'))['step'] == seen[-1][-1]
        if 'checkpoint_e0_s4.pt' in path:  # a write that does not read back as written
            with open(path, 'r+b') as f:
                f.seek(size // 2)
                f.write(b'\x00' * 16)
        real_verify(path, size, sha)

    manager.save(_state(1))
    manager.wait()
    monkeypatch.setattr(checkpoints, 'verify', verify_and_look)
    for step in (2, 3):
        manager.save(_state(step))
    with pytest.raises(checkpoints.CheckpointWriteError, match=r'checkpoint_e0_s4\.pt\.tmp.*sha256'):
        manager.save(_state(4))  # sync: raises here; async: at the next wait
        manager.wait()
    assert seen == [[1], [2], [3]]  # keep=1: one on disk, checkpoint.pt, while the next is written and verified
    assert [f[1] for f in manager.kept()] == [3] and not [n for n in os.listdir(tmp_path) if '.tmp.' in n]
    assert utils.load_checkpoint(str(tmp_path / 'checkpoint.pt'))['state_dict']['w'][0, 0] == 3
    for step in (5, 6):  # while a divergence is suspected, the newest checkpoint at or before (0, 3) stays
        manager.save(_state(step), protect=(0, 3))
    manager.wait()
    assert [f[1] for f in manager.kept()] == [3, 6] and seen[3:] == [[3], [3, 5]]
    manager.save(_state(7))  # the suspicion cleared
    manager.close()
    assert [f[1] for f in manager.kept()] == [7]



def test_a_signal_that_raises_while_training_waits_for_a_write_leaves_the_writer_waited_for(tmp_path, monkeypatch):
    """submitit requeues by raising SystemExit from a signal handler wherever training is. Raised while training waits
    for the write in flight, the writer must still run to its end before ``close`` returns: a thread the interpreter's
    exit does not wait for aborts the process when it frees its tensors (issue 25's CI failure)."""
    manager = checkpoints.CheckpointManager(str(tmp_path), keep=1)
    writing, real_commit = threading.Event(), checkpoints.CheckpointManager.commit

    def slow_commit(self, *job):
        writing.set()
        time.sleep(0.5)
        real_commit(self, *job)

    def requeue(signum, frame):
        raise SystemExit(3)

    monkeypatch.setattr(checkpoints.CheckpointManager, 'commit', slow_commit)
    previous = signal.signal(signal.SIGALRM, requeue)
    try:
        manager.save(_state(1))
        assert writing.wait(10)
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        with pytest.raises(SystemExit):
            manager.wait()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    manager.close()  # what main's finally does on the way out
    assert [t for t in threading.enumerate() if t.name == 'checkpoint-writer'] == []
    assert utils.load_checkpoint(str(tmp_path / 'checkpoint.pt'))['step'] == 1

def test_host_copy_is_detached_from_the_training_tensors():
    w = torch.ones(3)
    cache = {}
    copy = checkpoints.host_copy({'a': [w, 2], 'b': 'x'}, cache)
    w.add_(1)  # training goes on
    assert torch.equal(copy['a'][0], torch.ones(3)) and copy['a'][1] == 2 and copy['b'] == 'x'
    again = checkpoints.host_copy({'a': [w, 2], 'b': 'x'}, cache)
    assert again['a'][0].data_ptr() == copy['a'][0].data_ptr()  # the buffer is reused from save to save


def test_kill_during_async_save_keeps_the_previous_checkpoint_and_the_rerun_is_bitwise_exact(tmp_path,
                                                                                           sigkill_and_rerun):
    reference, killed = tmp_path / 'reference', tmp_path / 'killed'
    main_script.main(run_args(reference, epochs=1))
    cmd = [sys.executable, 'main.py',
           *map(str, vars_to_argv(run_args(killed, *FAULT, 'kill-during-save@3', epochs=1)))]
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')

    def partial_write_left_behind():
        names = os.listdir(killed)
        (tmp,) = [n for n in names if n.startswith('checkpoint_e0_s4.pt.tmp.')]  # the write the kill cut short
        assert checkpoints.KILL_AFTER_BYTES <= os.path.getsize(killed / tmp) < os.path.getsize(killed / 'checkpoint.pt')
        assert 'checkpoint_e0_s4.pt' not in names
        assert json.loads((killed / 'injected_faults.json').read_text()) == ['kill-during-save@3']

    sigkill_and_rerun(cmd, env, killed / 'checkpoint.pt', step=3, self_killing=True, between=partial_write_left_behind)
    assert_bitwise_equal(reference / 'checkpoint.pt', killed / 'checkpoint.pt')
    assert not [n for n in os.listdir(killed) if '.tmp.' in n]  # the rerun removed the partial file


def vars_to_argv(args):
    """Command-line flags that reproduce the demo run ``args`` of run_args."""
    flags = ('dataset', 'model', 'demo_samples', 'batch_size', 'epochs', 'warmup_epochs', 'lr', 'workers',
             'precision', 'eval_dataset', 'print_freq', 'save_every_steps', 'keep_checkpoints', 'guard_window',
             'output_dir', 'inject_fault')
    argv = [x for f in flags if getattr(args, f) is not None for x in (f'--{f.replace("_", "-")}', getattr(args, f))]
    return argv + ['--allow-fault-injection'] * args.allow_fault_injection


# ----------------------------------------------------------------------------------------------------------------
# Fault injection is explicit
# ----------------------------------------------------------------------------------------------------------------
def test_fault_injection_is_refused_without_the_explicit_flag_or_when_unreadable(tmp_path):
    with pytest.raises(SystemExit, match='--inject-fault .*add --allow-fault-injection'):
        main_script.main(run_args(tmp_path, '--inject-fault', 'nan@3'))
    with pytest.raises(SystemExit, match="--inject-fault: cannot read 'explode@3'"):
        main_script.main(run_args(tmp_path, *FAULT, 'nan@3,explode@3'))
    assert not (tmp_path / 'checkpoint.pt').exists()


def test_fault_injection_is_refused_on_resume_of_a_run_without_it(tmp_path):
    main_script.main(run_args(tmp_path, samples=16, epochs=1))
    with pytest.raises(SystemExit, match=r"(?s)--inject-fault: checkpoint None, now 'nan@1'.*--resume-override"):
        main_script.main(run_args(tmp_path, *FAULT, 'nan@1', samples=16, epochs=1))
    ckpt = torch.load(tmp_path / 'checkpoint.pt', weights_only=True)
    del ckpt['args']['inject_fault']  # as a checkpoint from before the flag
    torch.save(ckpt, tmp_path / 'checkpoint.pt')
    with pytest.raises(SystemExit, match='does not record fault injection'):
        main_script.main(run_args(tmp_path, *FAULT, 'nan@1', samples=16, epochs=1))


# ----------------------------------------------------------------------------------------------------------------
# The guard's statistic
# ----------------------------------------------------------------------------------------------------------------
def test_guard_never_flags_a_falling_noisy_loss():
    """A loss falling fast (from 9 to 3, as CLIP's early training) with 2% noise and heavy-tailed outliers: 5000
    steps, no step flagged."""
    rng = np.random.default_rng(0)
    g = guard.DivergenceGuard(window=100, mads=8, patience=3)
    steps = np.arange(5000)
    loss = 3 + 6 * np.exp(-steps / 300) + 0.02 * 3 * rng.standard_t(df=3, size=steps.size)
    flagged = [g.observe(int(s), float(x)) for s, x in zip(steps, loss, strict=True)]
    assert all(f is None for f in flagged) and g.n_high == 0


def test_guard_flags_a_spike_after_patience_steps_and_ignores_a_short_one():
    g = guard.DivergenceGuard(window=20, mads=8, patience=3)
    rng = np.random.default_rng(1)
    for s in range(19):
        assert g.observe(s, 4 + 0.01 * rng.standard_normal()) is None
    assert g.threshold() is None  # no decision before the window is full
    g.observe(19, 4.0)
    assert 4.0 < g.threshold() < 4.5
    assert g.observe(20, 9.0) is None and g.observe(21, 9.0) is None  # two high steps...
    assert g.observe(22, 4.0) is None and g.n_high == 0  # ...then back to normal: no divergence
    assert g.observe(23, float('nan')) is None  # non-finite: the engine's policy, not the guard's
    assert [g.observe(s, 9.0) for s in (24, 25, 26)] == [None, None, (24, 26)]
    state = g.state_dict()
    other = guard.DivergenceGuard(window=20, mads=8, patience=3)
    other.load_state_dict(state)
    assert other.state_dict() == state and other.threshold() == g.threshold()


def test_constant_loss_is_not_flagged_for_rounding_noise():
    g = guard.DivergenceGuard(window=10, mads=8, patience=1)
    for s in range(10):
        g.observe(s, 2.0)
    assert g.observe(10, 2.0 + 1e-4) is None and g.observe(11, 2.2) == (11, 11)  # floor: 0.5% of the median


def test_skip_windows_split_at_epoch_boundaries():
    assert guard.skip_windows(6, 17, 8) == [[0, 6, 7], [1, 0, 7], [2, 0, 1]]
    assert guard.skip_windows(9, 12, 8) == [[1, 1, 4]]


# ----------------------------------------------------------------------------------------------------------------
# 2 gloo processes decide together
# ----------------------------------------------------------------------------------------------------------------
def _decide_worker(rank, world_size, init_file, out_dir):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world_size)
    try:
        g = guard.DivergenceGuard(window=8, mads=8, patience=2)
        decisions = []
        for step in range(14):
            # each rank sees its own loss; rank 1's alone spikes at steps 10 and 11, rank 0's is NaN at step 5
            local = 4.0 + 0.01 * ((step * 7 + rank * 3) % 5) + (20.0 if rank == 1 and step >= 10 else 0.0)
            local = float('nan') if rank == 0 and step == 5 else local
            finite, mean = engine_lib.all_ranks_finite(torch.tensor(local == local), torch.tensor(local),
                                                       torch.device('cpu'))
            decisions.append((finite, g.observe(step, mean) if finite else None))
        torch.save(decisions, os.path.join(out_dir, f'decisions{rank}.pt'))
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_two_ranks_take_the_same_rollback_decision(tmp_path):
    mp.spawn(_decide_worker, args=(2, str(tmp_path / 'init'), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f'decisions{r}.pt', weights_only=True) for r in range(2)]
    assert ranks[0] == ranks[1]  # one all-reduce: the same finite flag and mean loss on both ranks
    assert [f for f, _ in ranks[0]] == [s != 5 for s in range(14)]  # one rank's NaN is every rank's
    # rank 1's spike alone raises the mean: both ranks see the divergence at step 11, the second high step
    assert [d for _, d in ranks[0]] == [None] * 11 + [(10, 11), (10, 12), (10, 13)]


def test_bench_save_reports_the_stall_of_sync_and_async_saves(tmp_path):
    import bench_save
    rows = bench_save.bench_save(argparse.Namespace(model='CLIP_TINY', device='cpu', saves=2,
                                                    output_dir=str(tmp_path), keep=False))
    modes = ('sync', 'sync-verified', 'async')
    assert [(r['mode'], r['save']) for r in rows] == [(m, i) for m in modes for i in (0, 1)]
    for r in rows:
        assert 0 < r['stall_s'] <= r['write_s'] and r['checkpoint_mb'] > 1
    assert set(bench_save.summarize(rows)) == {'sync', 'sync-verified', 'async'}
    assert not os.listdir(tmp_path)  # the benchmark's files are removed
