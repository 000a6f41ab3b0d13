"""Losses against naive per-sample reference formulas written here, values and gradients (single process)."""

import pytest
import torch

import losses
import models


def _embeds(n=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    names = ['image_embed', 'text_embed', 'aug1_embed', 'aug2_embed']
    out = {k: torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_() for k in names}
    out['logit_scale'] = torch.tensor(1 / 0.07, dtype=torch.float64, requires_grad=True)
    return out


def naive_clip(out):
    """Mean over samples of the two InfoNCE terms, written out with Python loops."""
    img = [v / v.norm() for v in out['image_embed']]
    txt = [v / v.norm() for v in out['text_embed']]
    s, n, total = out['logit_scale'], len(img), 0.0
    for i in range(n):
        li = torch.stack([s * (img[i] @ txt[j]) for j in range(n)])
        lt = torch.stack([s * (txt[i] @ img[j]) for j in range(n)])
        total = total + (torch.logsumexp(li, 0) - li[i]) + (torch.logsumexp(lt, 0) - lt[i])
    return total / (2 * n)


def naive_simclr(out, tau):
    """NT-Xent: for view a of sample i the positive is view b of i; negatives are every other embedding."""
    a = [v / v.norm() for v in out['aug1_embed']]
    b = [v / v.norm() for v in out['aug2_embed']]
    n, total = len(a), 0.0
    for q_list, k_same, k_other in ((a, a, b), (b, b, a)):
        for i in range(n):
            pos = q_list[i] @ k_other[i] / tau
            others = [q_list[i] @ k_other[j] / tau for j in range(n)] + \
                     [q_list[i] @ k_same[j] / tau for j in range(n) if j != i]
            total = total + torch.logsumexp(torch.stack(others), 0) - pos
    return total / (2 * n)


def _grads(loss, out):
    return torch.autograd.grad(loss, [out[k] for k in sorted(out)], allow_unused=True)


def test_clip_loss_matches_naive():
    out = _embeds()
    result = losses.CLIPLoss()(out)
    assert set(result) == {'loss', 'clip_loss', 'clip_acc'}
    assert not result['clip_loss'].requires_grad and not result['clip_acc'].requires_grad
    ref = naive_clip(out)
    torch.testing.assert_close(result['loss'].double(), ref, rtol=1e-5, atol=1e-6)
    _check_grads_close(result['loss'], ref, out)


def _check_grads_close(value, reference, out):
    """Same gradient for every model output, and the same outputs left without one (unused by both losses)."""
    grads = list(zip(sorted(out), _grads(value, out), _grads(reference, out), strict=True))
    assert [k for k, g1, _ in grads if g1 is None] == [k for k, _, g2 in grads if g2 is None]
    assert any(g1 is not None for _, g1, _ in grads)
    for k, g1, g2 in grads:
        if g1 is not None:
            torch.testing.assert_close(g1.double(), g2, rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize('tau', [0.1, 0.5])
def test_simclr_loss_matches_naive(tau):
    out = _embeds(seed=1)
    result = losses.SIMCLRLoss(temperature=tau)(out)
    assert set(result) == {'loss', 'ssl_loss', 'ssl_acc'}
    ref = naive_simclr(out, tau)
    torch.testing.assert_close(result['loss'].double(), ref, rtol=1e-5, atol=1e-6)
    _check_grads_close(result['loss'], ref, out)


def test_slip_loss_combines_with_scale():
    out = _embeds(seed=2)
    result = losses.SLIPLoss(losses.SIMCLRLoss(0.1), ssl_scale=0.5)(out)
    assert set(result) == {'loss', 'clip_loss', 'clip_acc', 'ssl_loss', 'ssl_acc'}
    ref = naive_clip(out) + 0.5 * naive_simclr(out, 0.1)
    torch.testing.assert_close(result['loss'].double(), ref, rtol=1e-5, atol=1e-6)
    _check_grads_close(result['loss'], ref, out)
    torch.testing.assert_close(result['loss'], result['clip_loss'] + 0.5 * result['ssl_loss'])


def test_accuracy_metrics_count_matches():
    n = 4
    eye = torch.eye(n, 8)
    out = {'image_embed': eye.clone(), 'text_embed': eye.clone(), 'logit_scale': torch.tensor(10.0),
           'aug1_embed': eye.clone(), 'aug2_embed': eye.clone()}
    assert losses.CLIPLoss()(out)['clip_acc'].item() == 100.0
    out['text_embed'] = eye.roll(1, dims=0)  # every caption belongs to the next image
    assert losses.CLIPLoss()(out)['clip_acc'].item() == 0.0
    assert losses.SIMCLRLoss()(out)['ssl_acc'].item() == 100.0
    out['aug2_embed'] = eye.roll(1, dims=0)  # every second view matches the next sample's first view
    assert losses.SIMCLRLoss()(out)['ssl_acc'].item() == 0.0


def test_get_loss_reads_family_from_registry():
    assert isinstance(models.get_loss('CLIP_VITB16'), losses.CLIPLoss)
    assert isinstance(models.get_loss('SIMCLR_TINY', ssl_temp=0.2), losses.SIMCLRLoss)
    slip = models.get_loss('CLIP_SIMCLR_VITB16', ssl_temp=0.2, ssl_scale=2.0)  # legacy name of SLIP
    assert isinstance(slip, losses.SLIPLoss) and slip.ssl_scale == 2.0 and slip.ssl_loss.tau == 0.2
    assert models.get_loss('CLIP_TINY', legacy_clip_gather=True).gather_with_grad is False
    with pytest.raises(ValueError, match='unknown model family'):
        losses.loss_for_family('byol')


def test_simclr_loss_runs_under_fp16_autocast_and_matches_fp32():
    # the self-similarity mask once filled fp16 logits with -1e9, which overflows fp16 and raised
    out = {k: v.detach().float() for k, v in _embeds(n=8, d=16, seed=3).items()}
    loss = losses.SIMCLRLoss(0.1)
    reference = loss(out)['loss']
    with torch.autocast('cpu', dtype=torch.float16):
        half = loss(out)['loss']
    assert torch.isfinite(half)
    torch.testing.assert_close(half.float(), reference, rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------------------------------------------
# Rank r of W played in one process: the loss's rank and world size, the global batch passed as ``gathered``
# (tests/test_dist.py checks the same against 2 real gloo processes)
# ----------------------------------------------------------------------------------------------------------------
def _loss(kind, rank=None, world_size=None, legacy=False):
    if kind == 'clip':
        return losses.CLIPLoss(gather_with_grad=not legacy, rank=rank, world_size=world_size)
    if kind == 'simclr':
        return losses.SIMCLRLoss(0.2, rank=rank, world_size=world_size)
    return losses.SLIPLoss(losses.SIMCLRLoss(0.2, rank, world_size), 0.5, not legacy, rank, world_size)


def _rank_slice(out, rank, world_size):
    """Rank ``rank``'s outputs: its rows of every embedding (views of the global leaves), the shared logit scale."""
    n = out['image_embed'].shape[0] // world_size
    return {k: v if v.dim() == 0 else v[rank * n:(rank + 1) * n] for k, v in out.items()}


@pytest.mark.parametrize('kind', ['clip', 'simclr', 'slip'])
@pytest.mark.parametrize('world_size', [2, 4])
def test_mean_over_played_ranks_equals_the_full_batch_loss_and_gradient(kind, world_size):
    """Labels offset by rank x local batch and columns over the whole batch: the ranks' mean loss (what DDP trains)
    is the loss of one process with the whole batch, and so is its gradient for every output."""
    out = _embeds(n=8, seed=4)
    per_rank = [_loss(kind, r, world_size)(_rank_slice(out, r, world_size), gathered=out) for r in range(world_size)]
    mean = sum(r['loss'] for r in per_rank) / world_size
    full = _loss(kind)(out)['loss']
    torch.testing.assert_close(mean, full)
    _check_grads_close(mean, full, out)
    assert not torch.allclose(per_rank[0]['loss'], per_rank[1]['loss'])  # each rank has a loss of its own


def test_played_rank_finds_its_positives_at_its_offset():
    n, world_size = 4, 2
    eye = torch.eye(n * world_size, 8)
    whole = {'image_embed': eye, 'text_embed': eye, 'aug1_embed': eye, 'aug2_embed': eye,
             'logit_scale': torch.tensor(10.0)}
    for rank in range(world_size):
        result = _loss('slip', rank, world_size)(_rank_slice(whole, rank, world_size), gathered=whole)
        # rank 1's positives are columns 4-7: labels 0-3 (no offset) would count none of them
        assert (result['clip_acc'].item(), result['ssl_acc'].item()) == (100.0, 100.0)


def test_gradient_of_a_played_rank_reaches_other_ranks_samples_only_with_the_gather_with_grad():
    """With gradient, rank 0's loss sends a gradient to rank 1's samples (as columns, through the all-gather); the
    original's gather (``gather_with_grad=False``) gives the same loss but sends none, and rank 0's own samples get
    theirs through its rows only -- as in a real run, where the gathered copy of the own slice has no gradient."""
    out = _embeds(n=8, seed=5)
    grads = {}
    for legacy in (False, True):
        loss = _loss('clip', 0, 2, legacy)(_rank_slice(out, 0, 2), gathered=out)['loss']
        grads[legacy] = torch.autograd.grad(loss, [out['image_embed']])[0]
        grads[legacy, 'loss'] = loss.detach()
    torch.testing.assert_close(grads[True, 'loss'], grads[False, 'loss'])
    assert torch.count_nonzero(grads[False][4:]).item() == 4 * 5 and torch.count_nonzero(grads[True][4:]).item() == 0
    assert torch.count_nonzero(grads[True][:4]).item() == 4 * 5
    assert not torch.allclose(grads[True][:4], grads[False][:4])  # without the own slice's columns


def test_rank_and_world_size_default_to_a_single_process_without_a_process_group():
    out = _embeds(seed=6)
    torch.testing.assert_close(losses.CLIPLoss()(out)['loss'], losses.CLIPLoss(rank=0, world_size=1)(out)['loss'])
    slip = losses.loss_for_family('slip', rank=1, world_size=2)
    assert (slip.clip_loss.rank, slip.clip_loss.world_size, slip.ssl_loss.rank, slip.ssl_loss.world_size) == \
        (1, 2, 1, 2)
    with pytest.raises(ValueError, match='pass gathered= to play a rank in one process'):
        losses.CLIPLoss(rank=0, world_size=2)(out)
    with pytest.raises(ValueError, match=r'rank must be in \[0, world_size\), got rank 2 of world size 2'):
        losses.SIMCLRLoss(rank=2, world_size=2)(out, gathered=out)
    with pytest.raises(ValueError, match=r'gathered features of shape \(6, 5\): expected world size x local batch '
                                         r'\(3 x 6\) rows of \(5,\)'):
        losses.CLIPLoss(rank=0, world_size=3)(out, gathered=out)
