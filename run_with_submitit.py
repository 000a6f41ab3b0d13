"""Slurm launcher (through submitit) for pre-training, the linear probe and fine-tuning; requeues itself on preemption.

Pre-training, SLIP ViT-B/16 on 8 nodes x 8 GPUs (global batch 4096), as the seed's README:
    export SLIP_SHARED_DIR=/checkpoint/$USER/experiments/slip     # or --shared-dir; a folder every node can write
    python run_with_submitit.py --root /path/to/yfcc100m --model SLIP_VITB16 --lr 3e-3 --wd 0.1
Linear probe and fine-tuning (thin entries over this file; the same as --stage linear / --stage finetune):
    python run_with_submitit_linear.py --nodes 1 --pretrained slip_base_100ep.pt --dataset imagenet
    python beit_finetuning/run_with_submitit_finetune.py --finetune slip_base_100ep.pt --data_path /path/to/imagenet
Each task runs what one process of this would run (here for pre-training, per node):
    torchrun --nnodes=8 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=$HEAD:29500 main.py \
        --root /path/to/yfcc100m --model SLIP_VITB16 --lr 3e-3 --wd 0.1 --output-dir <job folder>
Without Slurm, on this machine: add --cluster local --nodes 1 (and --device cpu --ngpus 1 on a CPU-only box).

Every flag of the stage script passes through unchanged (its parser is composed as a parent, after a first parse of
--stage). The stage's output directory is the job folder, --job_dir (default <shared>/%j; %j becomes the job id).
On timeout or preemption Slurm sends USR2 120 s ahead; submitit then calls Trainer.checkpoint(), which requeues the
same command pointed at the stage's own newest checkpoint in the job folder, so the job continues where it stopped
(up to 30 times). See docs/SLURM.md.
"""
import argparse
import contextlib
import copy
import dataclasses
import importlib
import os
import sys
from typing import Dict, Iterator, Optional

import utils
from utils import logger

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
SHARED_ENV = 'SLIP_SHARED_DIR'  # the shared folder when --shared-dir is not given
MAX_REQUEUES = 30  # the original's slurm_max_num_timeout
SIGNAL_DELAY_S = 120  # Slurm warns this long before the time limit: room to finish a step and exit


@dataclasses.dataclass(frozen=True)
class Stage:
    module: str  # the stage script, importable from the repository root; it has get_args_parser() and main(args)
    job_name: str  # Slurm job name, as the original launchers
    nodes: int  # default --nodes
    timeout: int  # default --timeout, minutes
    checkpoint: str  # the file the stage writes in its output directory and resumes from


STAGES = {
    'pretrain': Stage('main', 'slip', nodes=8, timeout=2800, checkpoint='checkpoint.pt'),
    'linear': Stage('main_linear', 'linear', nodes=2, timeout=1800, checkpoint='linear_checkpoint.pt'),
    'finetune': Stage('beit_finetuning.run_class_finetuning', 'beit', nodes=1, timeout=2800,
                      checkpoint='checkpoint-last.pth'),
}


class LaunchError(SystemExit):
    """A configuration error found before submission: printed as one line, without a traceback, exit status 1."""


def launcher_parser(stage: str) -> argparse.ArgumentParser:
    """The launcher's own flags, with the original's defaults for ``stage``."""
    spec = STAGES[stage]
    p = argparse.ArgumentParser('submitit launcher', add_help=False)
    a = p.add_argument_group('Slurm launcher (submitit)').add_argument
    a('--stage', default=stage, choices=list(STAGES), help='which script the job runs')
    a('--ngpus', default=8, type=int, help='GPUs per node; one process (Slurm task) per GPU; 0: one CPU process')
    a('--nodes', default=spec.nodes, type=int, help='number of nodes')
    a('--timeout', default=spec.timeout, type=int, help='time limit of one job in minutes (requeues continue it)')
    a('--job_dir', default='', type=str,
      help='job folder: submitit logs, checkpoints and the stage\'s outputs; %%j is replaced by the job id '
           '(default: <shared folder>/%%j)')
    a('--shared-dir', default=None,
      help=f'folder every node can read and write, for the job folders (default: ${SHARED_ENV})')
    a('--partition', default='learnlab', type=str, help='Slurm partition (empty: the cluster default)')
    a('--use_volta32', action='store_true', help='ask for 32 GB V100s (adds the constraint volta32gb)')
    a('--constraint', default='', type=str, help='Slurm --constraint, e.g. "a100|h100"')
    a('--comment', default='', type=str, help='Slurm --comment')
    a('--account', default='', type=str, help='Slurm --account')
    a('--qos', default='', type=str, help='Slurm --qos')
    a('--exclude', default='', type=str, help='nodes to avoid, e.g. "node[01-03]"')
    a('--mem-per-gpu', default=40, type=int, help='host memory per process in GB (the original asked 40 per GPU)')
    a('--cpus-per-task', default=10, type=int, help='CPU cores per process (data loading)')
    a('--cluster', default='slurm', choices=['slurm', 'local', 'debug'],
      help='submitit executor: slurm; local (subprocesses on this machine, one node); debug (in this process)')
    return p


def get_args_parser(stage: str = 'pretrain') -> argparse.ArgumentParser:
    """The launcher's flags followed by every flag of the stage script (its own get_args_parser() as a parent)."""
    stage_parser = importlib.import_module(STAGES[stage].module).get_args_parser()
    return argparse.ArgumentParser(description=f'Submit {STAGES[stage].module} to Slurm with submitit',
                                   parents=[launcher_parser(stage), stage_parser], add_help=False)


def parse_args(default_stage: str = 'pretrain', argv: Optional[list] = None) -> argparse.Namespace:
    """Two-stage parse: --stage first (it decides which script's flags exist), then everything."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('--stage', default=default_stage, choices=list(STAGES))
    stage = pre.parse_known_args(argv)[0].stage
    parser = argparse.ArgumentParser(description=f'Submit {STAGES[stage].module} to Slurm with submitit',
                                     parents=[get_args_parser(stage)])
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# Before submission: folders, resources
# ----------------------------------------------------------------------------------------------------------------
def _nearest_existing(path: str) -> str:
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def resolve_job_dir(args: argparse.Namespace) -> str:
    """The absolute job folder (may hold %j); raises LaunchError when it could not be written."""
    if args.job_dir:
        job_dir = os.path.abspath(args.job_dir)
        # the part before %j is created by submitit: its nearest existing ancestor must be a writable folder
        base = _nearest_existing(os.path.dirname(job_dir.split('%j')[0].rstrip(os.sep)) or os.sep)
        if not (os.path.isdir(base) and os.access(base, os.W_OK | os.X_OK)):
            raise LaunchError(f'error: --job_dir {args.job_dir!r}: cannot create it ({base!r} is not a writable '
                              'folder)')
        return job_dir
    source = '--shared-dir' if args.shared_dir else SHARED_ENV
    shared = args.shared_dir or os.environ.get(SHARED_ENV, '')
    if not shared:
        raise LaunchError(f'error: no shared folder: pass --shared-dir DIR or set {SHARED_ENV}=DIR (a folder every '
                          'node of the job can write, e.g. /checkpoint/$USER/experiments/slip), or give --job_dir')
    if not os.path.isdir(shared):
        raise LaunchError(f'error: shared folder {shared!r} (from {source}) does not exist or is not a folder')
    if not os.access(shared, os.W_OK | os.X_OK):
        raise LaunchError(f'error: shared folder {shared!r} (from {source}) is not writable')
    return os.path.join(os.path.abspath(shared), '%j')


def executor_parameters(args: argparse.Namespace) -> Dict[str, object]:
    """submitit AutoExecutor parameters: one task per GPU, as the original; no GPU asked for a CPU run."""
    tasks = max(args.ngpus, 1)
    cpu_only = args.ngpus == 0 or str(args.device or '').startswith('cpu')
    params = {'name': STAGES[args.stage].job_name, 'nodes': args.nodes, 'tasks_per_node': tasks,
              'gpus_per_node': 0 if cpu_only else args.ngpus, 'cpus_per_task': args.cpus_per_task,
              'mem_gb': args.mem_per_gpu * tasks, 'timeout_min': args.timeout,
              'slurm_signal_delay_s': SIGNAL_DELAY_S}
    constraint = '&'.join(c for c in (args.constraint, 'volta32gb' if args.use_volta32 else '') if c)
    optional = {'slurm_partition': args.partition, 'slurm_constraint': constraint, 'slurm_comment': args.comment,
                'slurm_account': args.account, 'slurm_qos': args.qos, 'slurm_exclude': args.exclude}
    params.update({k: v for k, v in optional.items() if v})
    return params


def check_resources(args: argparse.Namespace) -> None:
    if args.nodes < 1 or args.ngpus < 0 or args.timeout < 1:
        raise LaunchError(f'error: need --nodes >= 1, --ngpus >= 0 and --timeout >= 1 (got {args.nodes}, '
                          f'{args.ngpus}, {args.timeout})')
    if args.cluster != 'slurm' and args.nodes != 1:
        raise LaunchError(f'error: --cluster {args.cluster} runs on this machine only: use --nodes 1')
    if args.cluster == 'debug' and args.ngpus > 1:
        raise LaunchError('error: --cluster debug runs one process in this Python session: use --ngpus 1 (or 0)')


def build_executor(args: argparse.Namespace, job_dir: str):
    import submitit  # lazily: --help and argument parsing work without it
    executor = submitit.AutoExecutor(folder=job_dir, cluster=args.cluster, slurm_max_num_timeout=MAX_REQUEUES)
    executor.update_parameters(**executor_parameters(args))
    return executor


def _warn_ignored_output_dir(args: argparse.Namespace) -> None:
    default = importlib.import_module(STAGES[args.stage].module).get_args_parser().get_default('output_dir')
    if args.output_dir != default:
        logger.warning('the output directory %r is ignored: the job folder %r is used, as in the original',
                       args.output_dir, args.job_dir or '<shared>/%j')


def _export_repo_root() -> None:
    """The job unpickles the Trainer and imports the stage from this checkout, whatever its working directory."""
    paths = os.environ.get('PYTHONPATH', '').split(os.pathsep)
    if REPO_ROOT not in paths:
        os.environ['PYTHONPATH'] = os.pathsep.join([REPO_ROOT] + [p for p in paths if p])


def main(args: argparse.Namespace):
    """Validate, then submit one job running ``<stage module>.main(args)``; returns the submitit Job."""
    utils.setup_logging(0)
    check_resources(args)
    job_dir = resolve_job_dir(args)  # before anything is created or submitted
    _warn_ignored_output_dir(args)
    args.job_dir = job_dir
    args.output_dir = job_dir  # '%j' is replaced inside the job, where the id is known
    executor = build_executor(args, job_dir)
    trainer = Trainer(args, STAGES[args.stage].module, STAGES[args.stage].checkpoint)
    _export_repo_root()
    import submitit
    with submitit.helpers.clean_env():  # a launch from inside a Slurm job must not pass its own job's variables on
        job = executor.submit(trainer)
    logger.info('submitted %s job %s (%d node(s) x %d task(s)); logs and checkpoints in %s', args.stage, job.job_id,
                args.nodes, max(args.ngpus, 1), job_dir.replace('%j', str(job.job_id)))
    return job


# ----------------------------------------------------------------------------------------------------------------
# Inside the job
# ----------------------------------------------------------------------------------------------------------------
def master_port(job_id: str) -> int:
    """A port every task of a job agrees on without talking, different for concurrent jobs (ids differ)."""
    return utils.master_port_for_job(job_id)  # the same rule as a plain srun launch (utils.init_distributed_mode)


def rendezvous_env(job_env) -> Dict[str, str]:
    """torchrun-style variables for the stage's utils.init_distributed_mode (env:// rendezvous)."""
    nodes = max(int(job_env.num_nodes), 1)
    return {
        # one node: loopback always resolves; several: the job's first host, which holds global rank 0
        'MASTER_ADDR': job_env.hostnames[0] if nodes > 1 else '127.0.0.1',
        'MASTER_PORT': str(master_port(job_env.job_id)),
        'RANK': str(job_env.global_rank),
        'WORLD_SIZE': str(job_env.num_tasks),
        'LOCAL_RANK': str(job_env.local_rank),
        'LOCAL_WORLD_SIZE': str(job_env.num_tasks // nodes),
    }


@contextlib.contextmanager
def environment(variables: Dict[str, str]) -> Iterator[None]:
    """Set variables for the duration (the debug executor runs in the launching process, which must not keep them)."""
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _masked_exit(error: BaseException) -> Optional[SystemExit]:
    """The SystemExit, if any, that ``error`` was raised while handling."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, SystemExit):
            return error
        seen.add(id(error))
        error = error.__context__
    return None


def job_output_dir(output_dir: str, job_id: str) -> str:
    return str(output_dir).replace('%j', str(job_id))


class Trainer:
    """What a submitit job runs: ``<module>.main(args)`` with rank and world size from the job environment.

    It stores the module's name, not the module, so it pickles without the stage's imports. ``main`` fills args in
    place (device, rank, ...), so each call works on a copy and a requeue starts again from the launch-time args.
    """

    def __init__(self, args: argparse.Namespace, module: str, checkpoint_name: str, repo_root: str = REPO_ROOT):
        self.args = copy.deepcopy(args)
        self.module, self.checkpoint_name, self.repo_root = module, checkpoint_name, repo_root

    def __call__(self):
        import submitit
        job_env = submitit.JobEnvironment()
        args = copy.deepcopy(self.args)
        args.output_dir = job_output_dir(args.output_dir, job_env.job_id)
        os.makedirs(args.output_dir, exist_ok=True)
        args.dist_url = 'env://'
        if self.repo_root not in sys.path:
            sys.path.insert(0, self.repo_root)
        stage = importlib.import_module(self.module)
        with environment(rendezvous_env(job_env)):
            try:
                return stage.main(args)
            except Exception as error:
                # submitit's signal handler requeues by raising SystemExit wherever the stage happens to be; inside
                # torch.save the zip writer's cleanup then raises its own error, which must not hide the requeue
                requeue = _masked_exit(error)
                if requeue is None:
                    raise
                logger.warning('interrupted while the stage was busy (%s): exiting for the requeue', error)
                raise requeue from None

    def checkpoint(self):
        """Called by submitit on timeout or preemption (rank 0): the same job again, resuming from its checkpoint."""
        import submitit
        job_env = submitit.JobEnvironment()
        args = copy.deepcopy(self.args)
        path = os.path.join(job_output_dir(args.output_dir, job_env.job_id), self.checkpoint_name)
        if os.path.isfile(path):
            # the job's own newest state wins over a --resume / --finetune given at launch
            args.resume = path
            if hasattr(args, 'auto_resume'):
                args.auto_resume = True
            logger.warning('job %s interrupted: requeued, it resumes from %s', job_env.job_id, path)
        else:
            logger.warning('job %s interrupted before its first checkpoint: requeued from the start', job_env.job_id)
        return submitit.helpers.DelayedSubmission(type(self)(args, self.module, self.checkpoint_name, self.repo_root))


if __name__ == '__main__':
    main(parse_args('pretrain'))
