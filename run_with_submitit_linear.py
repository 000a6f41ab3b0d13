"""Slurm launcher (submitit) for the linear probe, main_linear.py; all logic lives in run_with_submitit.py.

The seed's recipe, one node x 8 GPUs (this launcher's defaults are the original's: 2 nodes, 1800 minutes):
    export SLIP_SHARED_DIR=/checkpoint/$USER/experiments/slip     # or --shared-dir
    python run_with_submitit_linear.py --nodes 1 --ngpus 8 --pretrained /path/to/slip_base_100ep.pt --dataset imagenet
What each node runs, without Slurm:
    torchrun --nproc_per_node=8 main_linear.py --pretrained /path/to/slip_base_100ep.pt --dataset imagenet \
        --output-dir <job folder>
A preempted or timed-out job requeues itself and resumes from <job folder>/linear_checkpoint.pt (docs/SLURM.md).
"""
import run_with_submitit

STAGE = 'linear'


def get_args_parser():
    """The launcher's flags plus every flag of main_linear.py."""
    return run_with_submitit.get_args_parser(STAGE)


def main(args):
    return run_with_submitit.main(args)


if __name__ == '__main__':
    main(run_with_submitit.parse_args(STAGE))
