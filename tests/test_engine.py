"""engine.py: exact accumulation equals one big batch, the legacy semantics, the step's policies, 2 gloo processes.

Exactness is asserted in float64, so that only a real difference (not float32 summation order) can fail it.
"""
import copy

import pytest
import torch
from timm.layers import DropPath

import augment
import bench
import engine as engine_lib
import losses
import models

TINY = ['CLIP_TINY', 'SIMCLR_TINY', 'SLIP_TINY']
RTOL = 1e-10


def _batch(name, n, seed=0) -> augment.Batch:
    batch = bench.synthetic_batch(models.get_spec(name), n, 'cpu', seed)
    return batch.apply(lambda t: t.double() if t.is_floating_point() else t)


def _engine(model, name, update_freq=1, legacy=False, **kw):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return engine_lib.Engine(model, models.get_loss(name), optimizer, device=torch.device('cpu'),
                             update_freq=update_freq, legacy_update_freq=legacy, **kw)


def _pair(name, checkpointing=False):
    torch.manual_seed(0)
    a = models.create_model(name).double()
    b = copy.deepcopy(a)
    a.set_grad_checkpointing(checkpointing)
    return a, b


def _assert_same_training(a, b, loss_a, loss_b):
    torch.testing.assert_close(loss_a, loss_b, rtol=RTOL, atol=0)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert pa.grad is not None and pb.grad is not None, n
        torch.testing.assert_close(pa.grad, pb.grad, rtol=RTOL, atol=1e-14, msg=n)
    for (n, ba), (_, bb) in zip(a.named_buffers(), b.named_buffers(), strict=True):
        torch.testing.assert_close(ba, bb, rtol=RTOL, atol=0, msg=n)  # BatchNorm running statistics


@pytest.mark.parametrize('name,checkpointing', [(n, False) for n in TINY] + [('SLIP_TINY', True)])
def test_exact_accumulation_of_4x8_equals_one_batch_of_32(name, checkpointing):
    """Loss, every parameter's gradient (logit_scale included) and the BatchNorm running statistics."""
    a, b = _pair(name, checkpointing)
    data = _batch(name, 32)
    metrics, outcome = _engine(a, name, update_freq=4).forward_backward(data.chunk(4))
    ref, _ = _engine(b, name).forward_backward([data])
    assert float(outcome[0]) == 0  # no rank with a non-finite loss
    _assert_same_training(a, b, metrics['loss'], ref['loss'])
    if name != 'SIMCLR_TINY':
        assert a.logit_scale.grad.abs() > 0  # the temperature really is trained, once


def _with_drop_path(model, p=0.3):
    for block in model.visual.blocks:
        block.drop_path1, block.drop_path2 = DropPath(p), DropPath(p)
    return model


@pytest.mark.parametrize('name', ['CLIP_TINY', 'SLIP_TINY'])
def test_exact_accumulation_replays_drop_path(name):
    """With drop path on, the second pass draws the masks of the first: the gradient equals one graph over the 32
    samples whose towers ran micro-batch by micro-batch with those same draws."""
    a, b = (_with_drop_path(m) for m in _pair(name))
    data = _batch(name, 32)
    micro = data.chunk(4)
    torch.manual_seed(7)
    metrics, _ = _engine(a, name, update_freq=4).forward_backward(micro)
    torch.manual_seed(7)
    features = [b.towers(mb) for mb in micro]
    ref = models.get_loss(name)(b.head({k: torch.cat([f[k] for f in features]) for k in features[0]}))
    ref['loss'].backward()
    _assert_same_training(a, b, metrics['loss'], ref['loss'])
    torch.manual_seed(8)  # the masks matter: other draws give other features
    assert not torch.allclose(b.towers(micro[0])['image_embed'], features[0]['image_embed'])


@pytest.mark.parametrize('name', ['CLIP_TINY', 'SLIP_TINY'])
def test_legacy_update_freq_is_the_per_micro_batch_loss(name):
    a, b = _pair(name)
    c = copy.deepcopy(b)
    micro = _batch(name, 16).chunk(2)
    metrics, _ = _engine(a, name, update_freq=2, legacy=True).forward_backward(micro)
    criterion = models.get_loss(name)
    ref_loss = 0
    for mb in micro:  # the original: each micro-batch its own contrastive batch, gradients averaged
        loss = criterion(b(mb))['loss'] / 2
        loss.backward()
        ref_loss = ref_loss + loss.detach()
    _assert_same_training(a, b, metrics['loss'], ref_loss)
    exact, _ = _engine(c, name, update_freq=2).forward_backward(micro)
    assert not torch.allclose(exact['loss'], metrics['loss'])  # 16 negatives per sample instead of 8


def test_step_updates_with_the_schedule_clamps_logit_scale_and_keeps_metrics_on_device():
    model = models.create_model('CLIP_TINY')
    eng = _engine(model, 'CLIP_TINY', update_freq=2)
    eng.set_schedule([0.5, 1e-4])
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # above the clamp
    before = model.visual.patch_embed.proj.weight.detach().clone()
    assert eng.step(bench.synthetic_batch(models.get_spec('CLIP_TINY'), 8, 'cpu').chunk(2), global_step=1)
    assert eng.optimizer.param_groups[0]["lr"] == 1e-4
    assert not torch.equal(before, model.visual.patch_embed.proj.weight)
    assert float(model.logit_scale.detach()) == pytest.approx(engine_lib.LOGIT_SCALE_MAX)
    assert all(p.grad is None for p in model.parameters())  # cleared for the next step
    values, steps = eng.read_metrics()
    assert steps == 1 and set(values) == {'loss', 'clip_loss', 'clip_acc', 'logit_scale'}
    assert values['logit_scale'] == pytest.approx(100.0)
    assert eng.read_metrics() == ({}, 0)


@pytest.mark.parametrize('exact', [True, False])
def test_nonfinite_step_is_skipped_and_counted_then_stops(monkeypatch, exact):
    model = models.create_model('CLIP_TINY')
    eng = _engine(model, 'CLIP_TINY', update_freq=2, legacy=not exact, max_nonfinite=2)
    real = losses.CLIPLoss.forward
    monkeypatch.setattr(losses.CLIPLoss, 'forward', lambda self, out: {**real(self, out),
                                                                       'loss': real(self, out)['loss'] * float('nan')})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    micro = bench.synthetic_batch(models.get_spec('CLIP_TINY'), 8, 'cpu').chunk(2)
    assert eng.step(micro) is False
    assert eng.skipped == 1 and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(RuntimeError, match='2 consecutive steps with a non-finite loss'):
        eng.step(micro)


# ----------------------------------------------------------------------------------------------------------------
# 2 gloo processes x 2 micro-batches of 4 against one process with a batch of 16
# ----------------------------------------------------------------------------------------------------------------
DIST_CASES = {'CLIP_TINY': {}, 'SLIP_TINY': {'ssl_head_norm': 'ln'}}  # CPU ranks share no BatchNorm statistics


def _dist_worker(rank, world_size):
    results = {}
    for name, kw in DIST_CASES.items():
        torch.manual_seed(0)
        model = models.create_model(name, **kw).double()
        eng = _engine(model, name, update_freq=2, distributed=True)
        local = _batch(name, 16).chunk(world_size)[rank]
        metrics, outcome = eng.forward_backward(local.chunk(2))
        results[name] = {'grads': {n: p.grad for n, p in model.named_parameters()}, 'nonfinite': float(outcome[0])}
    return results


@pytest.fixture(scope='module')
def dist_grads(gloo_run):
    return gloo_run(_dist_worker)[0]


@pytest.mark.dist
@pytest.mark.parametrize('name', list(DIST_CASES))
def test_two_ranks_accumulating_2x4_equal_one_process_batch_16(dist_grads, name):
    """DDP over 2 gloo processes with exact accumulation: every parameter's gradient (towers through the replayed
    micro-batches, head and logit_scale through the last one) equals one process's with the whole batch."""
    got = dist_grads[name]
    torch.manual_seed(0)
    model = models.create_model(name, **DIST_CASES[name]).double()
    _engine(model, name).forward_backward([_batch(name, 16)])
    assert got['nonfinite'] == 0
    for n, p in model.named_parameters():
        assert got['grads'][n] is not None, n
        torch.testing.assert_close(got['grads'][n], p.grad, rtol=RTOL, atol=1e-14, msg=n)


def test_exact_accumulation_with_a_layernorm_ssl_head_equals_one_big_batch():
    """--ssl-head-norm ln: a head without batch statistics (and without running buffers) accumulates exactly too."""
    torch.manual_seed(0)
    a = models.create_model('SIMCLR_TINY', ssl_head_norm='ln').double()
    b = copy.deepcopy(a)
    assert isinstance(a.image_mlp.bn1, torch.nn.LayerNorm)
    data = _batch('SIMCLR_TINY', 16)
    metrics, _ = _engine(a, 'SIMCLR_TINY', update_freq=2).forward_backward(data.chunk(2))
    ref, _ = _engine(b, 'SIMCLR_TINY').forward_backward([data])
    _assert_same_training(a, b, metrics['loss'], ref['loss'])


# ----------------------------------------------------------------------------------------------------------------
# Deferred reads (main.py's engine): nothing read inside a step, every outcome read and acted on at flush()
# ----------------------------------------------------------------------------------------------------------------
def _fused_engine(model, defer, **kw):
    """main.py's optimizer kind (fused AdamW, which can skip a step on the device), fp32, 2 micro-batches."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    return engine_lib.Engine(model, models.get_loss('CLIP_TINY'), optimizer, device=torch.device('cpu'),
                             update_freq=2, defer_reads=defer, **kw)


def _nan_at(monkeypatch, steps, engines):
    """The loss is NaN on the given global steps (read from whichever engine is stepping)."""
    real = losses.CLIPLoss.forward

    def forward(self, out):
        result = real(self, out)
        if any(e.global_step in steps for e in engines if getattr(e, "stepping", False)):
            result['loss'] = result['loss'] * float('nan')
        return result
    monkeypatch.setattr(losses.CLIPLoss, 'forward', forward)


def _run(eng, micro, steps):
    eng.stepping = True
    taken = [eng.step(micro, global_step=s, where=f'step {s}') for s in steps]
    eng.stepping = False
    return taken


@pytest.mark.parametrize('exact', [True, False])
def test_deferred_reads_skip_nonfinite_steps_bitwise_as_immediate_reads_do(monkeypatch, exact):
    """Steps 1 and 3 of 5 have a NaN loss: the deferring engine (skip on the device, read at flush) ends with the
    same parameters and AdamW state, bitwise, and the same counts as the engine that reads every step at once."""
    torch.manual_seed(0)
    a = models.create_model('CLIP_TINY')
    b = copy.deepcopy(a)
    deferred, immediate = _fused_engine(a, True, legacy_update_freq=not exact), \
        _fused_engine(b, False, legacy_update_freq=not exact)
    assert deferred.defer_reads and not immediate.defer_reads
    _nan_at(monkeypatch, {1, 3}, [deferred, immediate])
    micro = bench.synthetic_batch(models.get_spec('CLIP_TINY'), 8, 'cpu').chunk(2)
    assert _run(deferred, micro, range(5)) == [None] * 5  # not known yet
    assert deferred.skipped == 0
    assert deferred.flush() == [True, False, True, False, True]
    assert _run(immediate, micro, range(5)) == [True, False, True, False, True]
    assert deferred.skipped == immediate.skipped == 2 and deferred.streak == immediate.streak == 0
    assert deferred.last_loss == immediate.last_loss
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        for k in ('step', 'exp_avg', 'exp_avg_sq'):
            assert torch.equal(deferred.optimizer.state[pa][k], immediate.optimizer.state[pb][k]), k


def test_deferred_streak_and_guard_act_at_flush_in_step_order(monkeypatch):
    """max_nonfinite=2, NaN losses on steps 2 and 3: the steps run, then flush() reports step 0 and 1 to
    on_result (the guard's hook) with their own losses and raises NonFiniteStreak naming steps 2-3."""
    torch.manual_seed(0)
    eng = _fused_engine(models.create_model('CLIP_TINY'), True, max_nonfinite=2)
    _nan_at(monkeypatch, {2, 3}, [eng])
    seen = []
    eng.on_result = lambda step: seen.append((step, eng.last_loss, eng.streak))
    micro = bench.synthetic_batch(models.get_spec('CLIP_TINY'), 8, 'cpu').chunk(2)
    _run(eng, micro, range(5))
    assert seen == []
    with pytest.raises(engine_lib.NonFiniteStreak) as err:
        eng.flush()
    assert (err.value.first, err.value.last) == (2, 3)
    assert [s for s, _, _ in seen] == [0, 1, 2] and all(loss == loss for _, loss, _ in seen[:2])
    assert seen[2][2] == 1  # step 2 seen with its streak: the guard ignores a non-finite step
    assert eng.flush() == []  # step 4's outcome went with the aborted flush (a rollback follows)


def test_deferred_step_reads_nothing_and_flush_reads_once(count_reads):
    """On the padded text path (an accelerator's; the CPU's packed one reads the longest caption by design)."""
    torch.manual_seed(0)
    model = models.create_model('CLIP_TINY')
    model.pad_text = True
    eng = _fused_engine(model, True)
    micro = bench.synthetic_batch(models.get_spec('CLIP_TINY'), 8, 'cpu').chunk(2)
    with count_reads() as calls:
        for step in range(3):
            eng.step(micro, global_step=step)
    assert calls == []
    with count_reads() as calls:
        assert eng.flush() == [True, True, True]
    assert calls == ['tolist']


@pytest.mark.parametrize('defer', [True, False])
def test_an_epoch_reads_the_device_only_at_progress_lines(count_reads, defer):
    """train_one_epoch with one progress line (the last step): the reads of an epoch of 4 steps are those of an
    epoch of 1 (its progress line and epoch end) with main.py's deferring engine; the engine that reads every step
    shows the counter sees the per-step read (3 more)."""
    import argparse
    args = argparse.Namespace(print_freq=100, epochs=1, batch_size=8, world_size=1, max_bad_fraction=0.1)
    spec = models.get_spec('CLIP_TINY')
    reads = {}
    for n in (1, 4):
        torch.manual_seed(0)
        model = models.create_model('CLIP_TINY')
        model.pad_text = True  # an accelerator's text path
        eng = _fused_engine(model, defer)
        loader = [bench.synthetic_batch(spec, 8, 'cpu', seed) for seed in range(2 * n)]
        with count_reads() as calls:
            stats = engine_lib.train_one_epoch(eng, loader, 0, 0, n, args)
        reads[n] = len(calls)
        assert stats['skipped_steps'] == 0 and stats['loss'] == stats['loss']
    assert reads[4] - reads[1] == (0 if defer else 3)
