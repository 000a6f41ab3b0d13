"""The submitit launchers: flag composition, pre-submission checks, requeue, and real jobs on submitit's local executor.

The end-to-end jobs run main.py on CPU as subprocesses of submitit's LocalExecutor, exactly the code path of a Slurm
job except for sbatch; the interrupted one gets USR2, the signal Slurm sends before a time limit or a preemption.
"""
import argparse
import contextlib
import os
import pickle
import re
import runpy
import signal
import subprocess
import sys
import time

import pytest
import torch

import main as main_script
import main_linear
import run_with_submitit as rws
import utils
from beit_finetuning import run_class_finetuning

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRIES = {'pretrain': 'run_with_submitit.py', 'linear': 'run_with_submitit_linear.py',
           'finetune': 'beit_finetuning/run_with_submitit_finetune.py'}
STAGE_PARSERS = {'pretrain': main_script.get_args_parser, 'linear': main_linear.get_args_parser,
                 'finetune': run_class_finetuning.get_args_parser}
# a few stage flags of each script, in its own spelling
STAGE_ARGV = {
    'pretrain': ['--root', '/data/yfcc', '--model', 'SLIP_VITB16', '--lr', '3e-3', '--wd', '0.1', '--betas', '0.9',
                 '0.95', '--save-every-steps', '100', '--resume', '/x/ckpt.pt'],
    'linear': ['--pretrained', '/x/slip.pt', '--dataset', 'imagenet', '--wd', '1e-4', '-b', '256', '--lr', '0.01',
               '--cached-features'],
    'finetune': ['--batch_size', '128', '--enable_deepspeed', '--model', 'beit_base_patch16_224', '--lr', '4e-3',
                 '--opt_betas', '0.9', '0.999', '--no_auto_resume', '--model_prefix', 'module.visual.'],
}
TINY_PRETRAIN = ['--dataset', 'demo', '--model', 'CLIP_TINY', '--demo-samples', '96', '--batch-size', '8', '--epochs',
                 '1', '--workers', '0', '--precision', 'fp32', '--device', 'cpu', '--eval-dataset', 'none',
                 '--save-every-steps', '1', '--print-freq', '100', '--lr', '1e-3']


def launch_args(stage, shared, *argv, cluster='local'):
    return rws.parse_args(stage, ['--cluster', cluster, '--shared-dir', str(shared), '--nodes', '1', '--ngpus', '1',
                                  *map(str, argv)])


@contextlib.contextmanager
def job_environment():
    """What the launcher exports (PYTHONPATH) is undone afterwards; one thread per job keeps the busy cores fair."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('PYTHONPATH', os.environ.get('PYTHONPATH', ''))
        mp.setenv('OMP_NUM_THREADS', '1')
        yield mp


def weights(path):
    return utils.load_checkpoint(str(path))['state_dict']


# ----------------------------------------------------------------------------------------------------------------
# Argument composition (no submitit needed)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('stage', list(ENTRIES))
def test_help_lists_launcher_and_stage_flags(stage, capsys, monkeypatch):
    monkeypatch.setattr(sys, 'argv', [ENTRIES[stage], '--help'])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(os.path.join(REPO, ENTRIES[stage]), run_name='__main__')
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ('--ngpus', '--nodes', '--timeout', '--job_dir', '--partition', '--use_volta32', '--comment',
                 '--constraint', '--account', '--qos', '--mem-per-gpu', '--cpus-per-task', '--exclude', '--cluster',
                 '--shared-dir', rws.SHARED_ENV):
        assert flag in text, flag
    stage_flags = [s for a in STAGE_PARSERS[stage]()._actions for s in a.option_strings]
    assert stage_flags and all(f in text for f in stage_flags)


@pytest.mark.parametrize('stage', list(ENTRIES))
def test_stage_flags_pass_through_unchanged(stage, tmp_path):
    args = launch_args(stage, tmp_path, '--partition', 'gpu', *STAGE_ARGV[stage], cluster='slurm')
    own = STAGE_PARSERS[stage]().parse_args(STAGE_ARGV[stage])
    assert args.stage == stage and args.partition == 'gpu' and args.cluster == 'slurm'
    for key, value in vars(own).items():
        assert getattr(args, key) == value, key


def test_stage_flag_selects_the_script_and_defaults_follow_the_original(tmp_path):
    expected = {'pretrain': ('slip', 8, 2800), 'linear': ('linear', 2, 1800), 'finetune': ('beit', 1, 2800)}
    for stage, (name, nodes, timeout) in expected.items():
        args = rws.parse_args('pretrain', ['--stage', stage])
        params = rws.executor_parameters(args)
        assert (params['name'], params['nodes'], params['timeout_min']) == (name, nodes, timeout)
        assert params['gpus_per_node'] == params['tasks_per_node'] == 8  # one task per GPU
        assert params['mem_gb'] == 320 and params['cpus_per_task'] == 10
        assert params['slurm_partition'] == 'learnlab' and params['slurm_signal_delay_s'] == 120
    assert hasattr(rws.parse_args('linear', ['--stage', 'linear']), 'pretrained')


def test_slurm_parameters_are_valid_for_submitit():
    from submitit.auto.auto import AutoExecutor
    from submitit.slurm.slurm import SlurmExecutor
    args = rws.parse_args('pretrain', ['--use_volta32', '--constraint', 'ib', '--account', 'proj', '--qos', 'high',
                                       '--exclude', 'n[1-2]', '--comment', 'paper', '--ngpus', '4', '--nodes', '2',
                                       '--mem-per-gpu', '60', '--partition', ''])
    params = rws.executor_parameters(args)
    assert params['slurm_constraint'] == 'ib&volta32gb' and params['slurm_account'] == 'proj'
    assert params['slurm_qos'] == 'high' and params['slurm_exclude'] == 'n[1-2]' and params['slurm_comment'] == 'paper'
    assert 'slurm_partition' not in params  # empty: the cluster's default partition
    assert (params['nodes'], params['tasks_per_node'], params['gpus_per_node'], params['mem_gb']) == (2, 4, 4, 240)
    generic, slurm = set(AutoExecutor._valid_parameters()), SlurmExecutor._valid_parameters()
    for key in params:  # a misspelt name would only fail on a cluster
        assert key in generic or (key.startswith('slurm_') and key[len('slurm_'):] in slurm), key
    cpu = rws.executor_parameters(rws.parse_args('pretrain', ['--device', 'cpu', '--ngpus', '2']))
    assert cpu['gpus_per_node'] == 0 and cpu['tasks_per_node'] == 2
    assert rws.executor_parameters(rws.parse_args('pretrain', ['--ngpus', '0']))['tasks_per_node'] == 1


def test_parsing_and_help_do_not_import_submitit():
    code = ('import sys, run_with_submitit as r\n'
            'r.parse_args("linear", ["--pretrained", "x.pt"]); r.get_args_parser("finetune").format_help()\n'
            'print("submitit" in sys.modules)')
    out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == 'False'


# ----------------------------------------------------------------------------------------------------------------
# Checks before submission
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def no_submission(monkeypatch):
    def fail(*_):
        raise AssertionError('an executor was built although the configuration is invalid')
    monkeypatch.setattr(rws, 'build_executor', fail)
    monkeypatch.delenv(rws.SHARED_ENV, raising=False)


def test_bad_shared_folder_fails_before_submission(tmp_path, no_submission, monkeypatch):
    with pytest.raises(rws.LaunchError, match=f'--shared-dir DIR or set {rws.SHARED_ENV}'):
        rws.main(rws.parse_args('pretrain', ['--cluster', 'local', '--nodes', '1']))
    missing = tmp_path / 'nowhere'
    monkeypatch.setenv(rws.SHARED_ENV, str(missing))
    with pytest.raises(rws.LaunchError, match=f"'{missing}' \\(from {rws.SHARED_ENV}\\) does not exist"):
        rws.main(rws.parse_args('pretrain', ['--cluster', 'local', '--nodes', '1']))
    a_file = tmp_path / 'file'
    a_file.write_text('')
    with pytest.raises(rws.LaunchError, match="'.*file' \\(from --shared-dir\\) does not exist or is not a folder"):
        rws.main(launch_args('linear', a_file))
    with pytest.raises(rws.LaunchError, match='--job_dir .* cannot create it'):
        rws.main(rws.parse_args('pretrain', ['--cluster', 'local', '--nodes', '1', '--job_dir',
                                             str(a_file / 'x' / '%j')]))
    monkeypatch.setattr(os, 'access', lambda path, mode: False)  # as for a read-only mount, also for root
    with pytest.raises(rws.LaunchError, match=f"'{tmp_path}' \\(from --shared-dir\\) is not writable"):
        rws.main(launch_args('finetune', tmp_path))
    assert sorted(os.listdir(tmp_path)) == ['file']  # nothing was created


def test_local_executor_needs_one_node(tmp_path, no_submission):
    with pytest.raises(rws.LaunchError, match='--cluster local runs on this machine only: use --nodes 1'):
        rws.main(rws.parse_args('pretrain', ['--cluster', 'local', '--shared-dir', str(tmp_path)]))


# ----------------------------------------------------------------------------------------------------------------
# Inside the job: rendezvous and requeue
# ----------------------------------------------------------------------------------------------------------------
class FakeJobEnvironment:
    job_id, hostnames, num_nodes, num_tasks, global_rank, local_rank = '4242_7', ['gpu-a', 'gpu-b'], 2, 16, 9, 1


def test_rendezvous_variables_for_init_distributed_mode():
    env = rws.rendezvous_env(FakeJobEnvironment())
    assert env['MASTER_ADDR'] == 'gpu-a'  # the first node holds rank 0
    assert (env['RANK'], env['WORLD_SIZE'], env['LOCAL_RANK'], env['LOCAL_WORLD_SIZE']) == ('9', '16', '1', '8')
    assert 20000 <= int(env['MASTER_PORT']) < 40000 and env['MASTER_PORT'] == str(rws.master_port('4242_7'))
    assert rws.master_port('4242_7') != rws.master_port('4243_7')
    single = FakeJobEnvironment()
    single.num_nodes = 1
    assert rws.rendezvous_env(single)['MASTER_ADDR'] == '127.0.0.1'


@pytest.mark.parametrize('stage', list(ENTRIES))
def test_checkpoint_requeues_from_the_jobs_own_checkpoint(stage, tmp_path, monkeypatch):
    monkeypatch.setenv('SUBMITIT_EXECUTOR', 'local')
    monkeypatch.setenv('SUBMITIT_LOCAL_JOB_ID', '4242')
    args = launch_args(stage, tmp_path, *STAGE_ARGV[stage])
    args.output_dir = str(tmp_path / '%j')
    spec = rws.STAGES[stage]
    trainer = rws.Trainer(args, spec.module, spec.checkpoint)
    launched_resume = args.resume
    before = trainer.checkpoint().function  # no checkpoint yet: the launch-time flags, unchanged
    assert before.args.resume == launched_resume and before.args.output_dir == args.output_dir
    ckpt = tmp_path / '4242' / spec.checkpoint
    ckpt.parent.mkdir()
    ckpt.write_bytes(b'')
    delayed = trainer.checkpoint()
    requeued = pickle.loads(pickle.dumps(delayed.function))  # what the requeued job unpickles
    assert isinstance(requeued, rws.Trainer) and requeued.module == spec.module
    assert requeued.args.resume == str(ckpt) and requeued.args.output_dir == str(tmp_path / '%j')
    if stage == 'finetune':
        assert requeued.args.auto_resume  # even though --no_auto_resume was given at launch
    assert trainer.args.resume == launched_resume  # the running job's own args are untouched


def test_finetune_stage_runs_through_the_debug_executor(tmp_path):
    """The job imports beit_finetuning.run_class_finetuning inside __call__ (a synthetic-data throughput run)."""
    args = launch_args('finetune', tmp_path, '--model', 'beit_tiny_test', '--input_size', '32', '--batch_size', '2',
                       '--benchmark_steps', '1', '--disable_rel_pos_bias', '--abs_pos_emb', '--device', 'cpu',
                       '--precision', 'fp32', '--num_workers', '0', '--ngpus', '0', cluster='debug')
    with job_environment():
        job = rws.main(args)
        result = job.result()
        assert 'RANK' not in os.environ  # the debug job ran in this process and cleaned up after itself
    # the stage's own return value came back through the job: the throughput of its synthetic-data steps
    assert result['model'] == 'beit_tiny_test' and result['batch_size'] == 2 and result['images_per_s'] > 0
    assert os.path.isdir(tmp_path / str(job.job_id))  # the job folder is the stage's output directory


# ----------------------------------------------------------------------------------------------------------------
# Real jobs on submitit's local executor
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def reference_run(tmp_path_factory):
    shared = tmp_path_factory.mktemp('shared')
    with job_environment():
        job = rws.main(launch_args('pretrain', shared, *TINY_PRETRAIN))
        stats = job.result()
    return shared / str(job.job_id), stats, job


@pytest.mark.slow
def test_pretraining_job_runs_to_completion(reference_run):
    job_dir, stats, job = reference_run
    assert stats['epoch'] == 0 and stats['train_loss'] > 0
    ckpt = utils.load_checkpoint(str(job_dir / 'checkpoint.pt'))
    assert ckpt['epoch'] == 1 and ckpt['args']['output_dir'] == str(job_dir)  # %j became the job id
    assert (job_dir / 'log.txt').exists() and (job_dir / f'{job.job_id}_0_log.out').exists()
    assert 'Job completed successfully' in job.stdout()


def _children(pid):
    kids = []
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f'/proc/{entry}/stat') as f:
                if int(f.read().rsplit(')', 1)[1].split()[1]) == pid:
                    kids.append(int(entry))
    return kids


@pytest.mark.slow
def test_interrupted_job_requeues_and_matches_the_uninterrupted_run(reference_run, tmp_path):
    shared = tmp_path
    with job_environment():
        job = rws.main(launch_args('pretrain', shared, *TINY_PRETRAIN))
        ckpt = shared / str(job.job_id) / 'checkpoint.pt'
        deadline = time.time() + 180
        while time.time() < deadline:  # interrupt mid-epoch, after a few of the per-step checkpoints
            with contextlib.suppress(utils.CheckpointError):
                if ckpt.exists() and utils.load_checkpoint(str(ckpt)).get('step', 0) >= 3:
                    break
            time.sleep(0.05)
        tasks = _children(int(job.job_id))  # the controller's child: the task running Trainer.__call__
        assert len(tasks) == 1
        os.kill(tasks[0], signal.SIGUSR2)  # what Slurm sends before the time limit or on preemption
        job.result()
    log = job.stdout() + job.stderr()
    assert 'this job is preempted' in log and 'Requeued job' in log, log[-3000:]
    resumed = re.search(r'resumed from \S+ \(epoch 0, step (\d+)\)', log)
    assert resumed and 3 <= int(resumed.group(1)) < 12, log[-3000:]  # really mid-epoch
    ref, got = weights(reference_run[0] / 'checkpoint.pt'), weights(ckpt)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


@pytest.mark.slow
@pytest.mark.dist
def test_two_task_job_rendezvous_over_gloo(tmp_path):
    argv = [a if a != '96' else '32' for a in TINY_PRETRAIN] + ['--save-every-steps', '0']
    with job_environment():
        job = rws.main(launch_args('pretrain', tmp_path, *argv, '--ngpus', '2'))
        results = job.results()
    assert len(results) == 2  # both tasks returned
    ckpt = utils.load_checkpoint(str(tmp_path / str(job.job_id) / 'checkpoint.pt'))
    assert ckpt['args']['world_size'] == 2 and ckpt['epoch'] == 1
    assert 'global batch 16' in job.stderr() + job.stdout()


def test_requeue_exit_is_not_hidden_by_an_error_during_unwinding(tmp_path, monkeypatch):
    """The signal handler's SystemExit can land inside torch.save, whose cleanup then raises a RuntimeError."""
    (tmp_path / 'fake_stage.py').write_text(
        'def main(args):\n'
        '    try:\n'
        '        raise SystemExit(144)  # what submitit raises to requeue\n'
        '    finally:\n'
        '        raise RuntimeError("unexpected pos in the zip writer")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv('SUBMITIT_EXECUTOR', 'local')
    monkeypatch.setenv('SUBMITIT_LOCAL_JOB_ID', '77')
    trainer = rws.Trainer(argparse.Namespace(output_dir=str(tmp_path / '%j')), 'fake_stage', 'checkpoint.pt')
    try:
        with pytest.raises(SystemExit) as exit_info:
            trainer()
        assert exit_info.value.code == 144 and (tmp_path / '77').is_dir()
        (tmp_path / 'fake_stage.py').write_text('def main(args):\n    raise RuntimeError("a real bug")\n')
        sys.modules.pop('fake_stage', None)
        with pytest.raises(RuntimeError, match='a real bug'):  # any other error stays an error
            trainer()
    finally:
        sys.modules.pop('fake_stage', None)
    assert 'RANK' not in os.environ
