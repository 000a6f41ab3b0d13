"""Two real gloo processes: per-rank losses with DDP-averaged gradients equal the single-process full batch."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import losses
import utils

pytestmark = pytest.mark.dist
N, D_IN, D = 8, 6, 4  # global batch, input width, embedding width


class ToyHeads(nn.Module):
    """Linear maps standing in for the towers, so the full-batch gradient is exactly defined (no BatchNorm)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.img = nn.Parameter(torch.randn(D_IN, D, generator=g, dtype=torch.float64))
        self.txt = nn.Parameter(torch.randn(D_IN, D, generator=g, dtype=torch.float64))
        self.aug = nn.Parameter(torch.randn(D_IN, D, generator=g, dtype=torch.float64))
        self.logit_scale = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    def forward(self, x):  # x: [n, 4, D_IN] -> the model output dict
        return {'image_embed': x[:, 0] @ self.img, 'text_embed': x[:, 1] @ self.txt,
                'aug1_embed': x[:, 2] @ self.aug, 'aug2_embed': x[:, 3] @ self.aug,
                'logit_scale': self.logit_scale.exp()}


def _data():
    return torch.randn(N, 4, D_IN, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _make_loss(kind, legacy=False, rank=None, world_size=None):
    return {'clip': lambda: losses.CLIPLoss(gather_with_grad=not legacy, rank=rank, world_size=world_size),
            'simclr': lambda: losses.SIMCLRLoss(0.1, rank=rank, world_size=world_size),
            'slip': lambda: losses.SLIPLoss(losses.SIMCLRLoss(0.1, rank, world_size), 0.7, gather_with_grad=not legacy,
                                            rank=rank, world_size=world_size)}[kind]()


CASES = [('clip', False), ('simclr', False), ('slip', False), ('clip', True), ('slip', True)]


def _worker(rank, world_size):
    x = _data().chunk(world_size)[rank]
    results = {}
    for kind, legacy in CASES:
        model = nn.parallel.DistributedDataParallel(ToyHeads(), find_unused_parameters=True)
        out = _make_loss(kind, legacy)(model(x))
        out['loss'].backward()
        loss = out['loss'].detach().clone()
        results[f'{kind}-{legacy}-local'] = loss.clone()  # this rank's own loss, before the average over ranks
        dist.all_reduce(loss)
        results[f'{kind}-{legacy}'] = (loss / world_size, {n: p.grad.clone() for n, p in model.module.named_parameters()
                                                 if p.grad is not None})
    # meters: a weighted average over ranks with different counts
    meter = utils.AverageMeter()
    meter.update(1.0 + rank, n=1 + 2 * rank)
    meter.synchronize()
    results['meter'] = meter.avg
    gathered = utils.all_gather_batch([torch.full((2,), float(rank))])[0]
    results['gather'] = gathered
    return results


@pytest.fixture(scope='module')
def all_ranks(gloo_run):
    return gloo_run(_worker)


@pytest.fixture(scope='module')
def dist_results(all_ranks):
    return all_ranks[0]


def _single(kind):
    model = ToyHeads()
    out = _make_loss(kind)(model(_data()))
    out['loss'].backward()
    return out['loss'].detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('kind', ['clip', 'simclr', 'slip'])
def test_two_ranks_equal_full_batch(dist_results, kind):
    loss, grads = dist_results[f'{kind}-False']
    ref_loss, ref_grads = _single(kind)
    torch.testing.assert_close(loss, ref_loss)
    assert set(grads) == set(ref_grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, msg=name)


@pytest.mark.parametrize('kind', ['clip', 'slip'])
def test_legacy_gather_keeps_loss_but_drops_gradient(dist_results, kind):
    """The original's no-grad gather (SLIP issue #31): same loss value, different (incomplete) gradient."""
    loss, grads = dist_results[f'{kind}-True']
    ref_loss, ref_grads = _single(kind)
    torch.testing.assert_close(loss, ref_loss)
    assert not torch.allclose(grads['img'], ref_grads['img'])
    assert not torch.allclose(grads['txt'], ref_grads['txt'])


def test_meter_and_gather_across_ranks(dist_results):
    # rank 0: value 1 weight 1; rank 1: value 2 weight 3 -> (1 + 6) / 4
    assert dist_results['meter'] == pytest.approx(7 / 4)
    assert dist_results['gather'].tolist() == [0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize('kind,legacy', CASES)
def test_one_process_playing_each_rank_gives_the_gloo_losses_and_gradients(all_ranks, kind, legacy):
    """losses.py's ``gathered=``: one process playing rank r of 2 (its local outputs, the global batch's outputs)
    computes rank r's loss of the real 2-process run, and the mean over ranks of its gradient is the DDP-averaged
    gradient of that run (the legacy gather's incomplete one included)."""
    model = ToyHeads()
    data = _data()
    whole = model(data)
    total = 0
    for rank, x in enumerate(data.chunk(2)):
        out = _make_loss(kind, legacy, rank=rank, world_size=2)(model(x), gathered=whole)
        torch.testing.assert_close(out['loss'].detach(), all_ranks[rank][f'{kind}-{legacy}-local'])
        total = total + out['loss'] / 2
    total.backward()
    loss, grads = all_ranks[0][f'{kind}-{legacy}']
    torch.testing.assert_close(total.detach(), loss)
    assert set(grads) == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, g in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, g, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# A plain `srun python main.py`: Slurm variables only, no torchrun and no submitit
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('nodelist, host', [('node[001-004,010]', 'node001'), ('a,b', 'a'), ('gpu-01', 'gpu-01'),
                                            ('gpu-[07-08],cpu-1', 'gpu-07'), ('rack[1-2]-n[07,09]', 'rack1-n07'),
                                            ('localhost', 'localhost')])
def test_first_slurm_host_of_a_node_list(nodelist, host):
    assert utils.first_slurm_host(nodelist) == host


SRUN_TASK = """
import argparse, torch, torch.distributed as dist, utils
args = argparse.Namespace(device='cpu', dist_url='env://', world_size=1)
utils.init_distributed_mode(args)
t = torch.tensor([float(args.rank + 1)])
dist.all_reduce(t)
print('RESULT', args.rank, args.world_size, int(t.item()), flush=True)
utils.cleanup_distributed()
"""


def test_srun_without_launcher_forms_a_gloo_group_from_slurm_variables(tmp_path):
    import random
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items()
           if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT') and not k.startswith('SLURM')}
    job_id = str(random.randrange(10 ** 6))  # the port derives from it: random, so concurrent runs do not collide
    procs = [subprocess.Popen([sys.executable, '-c', SRUN_TASK], cwd=repo, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=dict(env, PYTHONPATH=repo, SLURM_PROCID=str(r), SLURM_NTASKS='2',
                                       SLURM_LOCALID=str(r), SLURM_JOB_NODELIST='localhost', SLURM_JOB_ID=job_id))
             for r in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    results = sorted(line.split()[1:] for out in outputs for line in out.splitlines() if line.startswith('RESULT'))
    assert results == [['0', '2', '3'], ['1', '2', '3']]  # both ranks joined one group: 1 + 2
