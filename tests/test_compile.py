"""The step without host syncs and its whole-graph compile (issue 23): the padded text path against the packed one,
the collate's text length, zero graph breaks, compiled equals eager, recompiles per length bucket, no device reads
inside a step, and checkpoints of a compiled engine. CPU only: compiled runs use the 'eager' / 'aot_eager' backends
(inductor's CPU compile is too slow for the suite); what they test is the capture, which every backend shares."""
import dataclasses

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

import augment
import engine as engine_lib
import models
import train_data
from test_train_data import cc3m, loader_args  # noqa: F401 (a fixture)

SOT, EOT = 49406, 49407
TINY = ['CLIP_TINY', 'SIMCLR_TINY', 'SLIP_TINY']
VITB = ['CLIP_VITB16', 'SIMCLR_VITB16', 'SLIP_VITB16']


def tokens(lengths, context=77, seed=0):
    """Token ids [B, context]: caption b is ``lengths[b]`` tokens long, start and end-of-text included."""
    g = torch.Generator().manual_seed(seed)
    text = torch.zeros(len(lengths), context, dtype=torch.long)
    for b, n in enumerate(lengths):
        text[b, 0], text[b, n - 1] = SOT, EOT
        text[b, 1:n - 1] = torch.randint(1, SOT, (n - 2,), generator=g)
    return text


def make_batch(name, batch_size=4, lengths=None, seed=0, pad_multiple=16):
    """A training batch of model ``name`` as the collate makes it (token ids cut with ``pad_multiple``)."""
    spec = models.get_spec(name)
    g = torch.Generator().manual_seed(seed)
    size = (batch_size, 3, spec.image_size, spec.image_size)
    fields = {}
    if spec.has_text:
        text = tokens(lengths or [3 + 4 * b for b in range(batch_size)], seed=seed)
        fields.update(image=torch.randn(size, generator=g),
                      text=text[:, :augment.text_length(text, pad_multiple)] if pad_multiple else text)
    if spec.has_ssl:
        fields.update(aug1=torch.randn(size, generator=g), aug2=torch.randn(size, generator=g))
    return augment.Batch(**fields)


# ----------------------------------------------------------------------------------------------------------------
# The padded text path (no host sync) and the collate's length
# ----------------------------------------------------------------------------------------------------------------
def test_text_length_rounds_the_longest_caption_up_and_caps_at_the_context():
    assert augment.text_length(tokens([2, 5]), 16) == 16
    assert augment.text_length(tokens([2, 17]), 16) == 32
    assert augment.text_length(tokens([77, 3]), 16) == 77  # 80 capped at the context length
    assert augment.text_length(tokens([9]), 1) == 9
    with pytest.raises(ValueError, match='--text-pad-multiple'):
        augment.text_length(tokens([9]), 0)


def test_collate_cuts_the_tokens_only_when_asked():
    samples = [augment.Batch(text=t) for t in tokens([4, 20, 7])]
    assert augment.Batch.collate(samples).text.shape == (3, 77)  # the DataLoader's default: unchanged
    cut = augment.Batch.collate(samples, text_pad_multiple=8)
    assert torch.equal(cut.text, tokens([4, 20, 7])[:, :24])


def caption_tokens(caption):
    """'cap 7' -> token ids [77] of a caption 7 + 2 tokens long (start and end-of-text included)."""
    return tokens([int(caption.split()[-1]) + 2])[0]


def test_training_loader_cuts_token_ids_to_the_rounded_longest_caption(cc3m):
    from test_device_decode import TrustingLoader
    root, meta = cc3m
    texts = {}
    for multiple in (0, 4):
        args = loader_args(root, meta, text_pad_multiple=multiple)
        batches, sampler, _ = train_data.build_train_loader(args, caption_tokens, torch.device('cpu'))
        batches.loader.dataset.dataset.source.load = TrustingLoader(lazy=True)
        sampler.set_epoch(1, 0, args.batch_size)
        texts[multiple] = [batch.text for batch in batches]
    assert len(texts[4]) == len(texts[0]) > 0
    for cut, full in zip(texts[4], texts[0]):
        longest = int(full.argmax(dim=-1).max()) + 1
        assert full.shape[1] == 77 and cut.shape[1] == -(-longest // 4) * 4
        assert torch.equal(cut, full[:, :cut.shape[1]]) and not full[:, cut.shape[1]:].any()


def _text_outputs(model, text, pad_text, truncate=True):
    """encode_text(text) and the gradient of a fixed weighted sum of it, per parameter."""
    model.truncate_text, model.pad_text = truncate, pad_text
    model.zero_grad(set_to_none=True)
    out = model.encode_text(text)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('name', ['CLIP_TINY', 'SLIP_TINY', 'CLIP_VITB16'])
def test_padded_text_equals_packed_and_original_in_float64(name):
    torch.manual_seed(0)
    text_config = models.TEXT_TINY if name.endswith('TINY') else models.TEXT_FULL  # ViT-B/16's: 512 wide, 12 layers
    model = models.FAMILY_CLASSES[models.get_spec(name).family](
        vision_width=8, vision_model=torch.nn.Identity(), **text_config, vocab_size=1000,
        **({'ssl_mlp_dim': 16, 'ssl_emb_dim': 8} if name.startswith('SLIP') else {})).double()  # the text tower alone
    text = tokens([2, 30, 9], seed=1)
    text = torch.where(text >= SOT, text - SOT + 998, text % 998)  # a 1000-id vocabulary (fast); end-of-text: 999
    ref, ref_grads = _text_outputs(model, text, None, truncate=False)  # the original: all 77 tokens
    runs = {'packed': (text, False), 'padded 77': (text, True),
            'padded 32': (text[:, :augment.text_length(text, 16)], True)}
    for label, (ids, pad) in runs.items():
        out, grads = _text_outputs(model, ids, pad)
        assert torch.allclose(out, ref, rtol=0, atol=1e-12), label
        assert grads.keys() == ref_grads.keys(), label
        for n, g in grads.items():
            assert torch.allclose(g, ref_grads[n], rtol=1e-9, atol=1e-12), (label, n)


def test_text_path_auto_is_packed_on_cpu_eager_and_padded_when_compiling(monkeypatch):
    model = models.create_model('CLIP_TINY')
    calls = []
    monkeypatch.setattr(torch.Tensor, 'nonzero', lambda self, *a, **k: calls.append(1) or torch.ops.aten.nonzero(self))
    model.encode_text(tokens([3, 8]))
    assert calls == [1]  # eager on the CPU: packed (its nonzero)
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    model.encode_text(tokens([3, 8]))
    assert calls == [1]  # compiling: padded, no nonzero


# ----------------------------------------------------------------------------------------------------------------
# Whole-graph capture
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from an empty cache (new modules would otherwise count against the recompile limit)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _graph_breaks(name, batch_size, checkpointing=False, **model_kwargs):
    torch.manual_seed(0)
    model, criterion = models.create_model(name, **model_kwargs), models.get_loss(name)
    model.set_grad_checkpointing(checkpointing)
    explained = torch._dynamo.explain(lambda batch: criterion(model(batch)))(make_batch(name, batch_size))
    return explained.graph_break_count, explained.graph_count, [str(r.reason)[:200] for r in explained.break_reasons]


@pytest.mark.parametrize('name', TINY)
def test_forward_and_loss_of_tiny_models_have_no_graph_break(name):
    assert _graph_breaks(name, 4) == (0, 1, [])  # (breaks, graphs, reasons); before issue 23: CLIP/SLIP 5 breaks


def test_forward_and_loss_with_grad_checkpointing_have_no_graph_break():
    assert _graph_breaks('SLIP_TINY', 4, checkpointing=True) == (0, 1, [])


@pytest.mark.parametrize('name', VITB)
def test_forward_and_loss_of_vitb16_models_have_no_graph_break(name):
    assert _graph_breaks(name, 2, ssl_mlp_dim=64, ssl_emb_dim=16) == (0, 1, [])


def _engine(model, name, update_freq=1, **kw):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return engine_lib.Engine(model, models.get_loss(name), optimizer, device=torch.device('cpu'),
                             update_freq=update_freq, **kw)


@pytest.mark.parametrize('name,update_freq,backend', [(n, 1, 'eager') for n in TINY] + [
    (n, 2, 'eager') for n in TINY] + [('SLIP_TINY', 1, 'aot_eager')])
def test_compiled_step_equals_eager_step(name, update_freq, backend):
    """Two optimizer steps through the engine, fp32: the compiled model against the eager one, both on the padded
    text path (padded == packed is the float64 test above; in fp32 their rounding differs by ~1e-5 after two SGD
    steps). Tolerance: 1e-5 relative / 1e-6 absolute on the loss and every parameter and buffer."""
    torch.manual_seed(0)
    eager_model = models.create_model(name)
    eager_model.pad_text = True
    compiled_model = models.create_model(name)
    compiled_model.load_state_dict(eager_model.state_dict())
    eager = _engine(eager_model, name, update_freq)
    compiled = _engine(compiled_model, name, update_freq, compile=True, compile_backend=backend)
    for step in range(2):
        data = make_batch(name, 8, lengths=[2, 9, 30, 5, 17, 3, 12, 7], seed=step)
        losses = []
        for e in (eager, compiled):
            torch.manual_seed(step)
            assert e.step(data.chunk(update_freq))
            losses.append(e.last_loss)
        assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)
    for (n, a), (_, b) in zip(eager_model.state_dict().items(), compiled_model.state_dict().items(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)


def test_recompiles_over_caption_lengths_2_to_77_stay_within_the_buckets():
    torch.manual_seed(0)
    model, criterion = models.create_model('CLIP_TINY'), models.get_loss('CLIP_TINY')
    counter = torch._dynamo.testing.CompileCounter()
    step = torch.compile(lambda batch: criterion(model(batch)), backend=counter, fullgraph=True, dynamic=False)
    lengths = set()
    with torch.no_grad():
        for n in range(2, 78):
            batch = make_batch('CLIP_TINY', 2, lengths=[n, 2], pad_multiple=16)
            lengths.add(batch.text.shape[1])
            step(batch)
    assert sorted(lengths) == [16, 32, 48, 64, 77]
    assert counter.frame_count == len(lengths)  # one compile per bucket, none per caption length


def test_exact_accumulation_compiles_each_stage_once_per_bucket_without_falling_back():
    """--update-freq 2 compiles, per text length, the towers (no grad), the replay and the last replay (with the
    head's gradients): 3 x 3 graphs here, more than dynamo's default limit of 8 per function (past which a fullgraph
    compile raises), and none again for a length already seen."""
    torch.manual_seed(0)
    counter = torch._dynamo.testing.CompileCounter()
    eng = _engine(models.create_model('CLIP_TINY'), 'CLIP_TINY', 2, compile=True, compile_backend=counter)
    for n in (2, 20, 77, 3, 77):  # lengths 16, 32, 77, then two already compiled
        eng.step(make_batch('CLIP_TINY', 4, lengths=[n, 2, 2, 2]).chunk(2))
    assert counter.frame_count == 3 * 3


# ----------------------------------------------------------------------------------------------------------------
# No device read inside a step
# ----------------------------------------------------------------------------------------------------------------
def test_read_counter_catches_a_read(count_reads):
    x = torch.arange(3.0)
    with count_reads() as calls:
        x.sum().item()
        int(x[1])
        torch.nonzero(x)
    assert calls == ['item', '__int__', 'nonzero']


@pytest.mark.parametrize('name', TINY)
def test_padded_forward_and_loss_read_nothing_on_the_host(name, count_reads):
    torch.manual_seed(0)
    model = models.create_model(name)
    if models.get_spec(name).has_text:
        model.pad_text = True  # the path an accelerator and the compiler take
    eng = _engine(model, name)
    batch = make_batch(name, 4)
    with count_reads() as calls:
        out = eng.net(batch, mode='loss')
        out['loss'].backward()
    assert calls == []
    with count_reads() as calls:  # an engine that reads each step's outcome at once: one read, which is caught
        eng.step([batch])
    assert calls == ['tolist']


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints of a compiled run
# ----------------------------------------------------------------------------------------------------------------
def test_compiled_engine_checkpoint_loads_strictly_into_an_eager_model(tmp_path):
    torch.manual_seed(0)
    model = models.create_model('SLIP_TINY')
    eng = _engine(model, 'SLIP_TINY', compile=True, compile_backend='eager')
    eng.step([make_batch('SLIP_TINY', 4)])
    assert eng.compile_s > 0  # the first compiled step's time (logged as 'compile took X s')
    assert all(k.startswith('_orig_mod.model.') for k in eng.net.state_dict())  # what a save of the wrapper writes
    assert eng.model is model  # main.py saves the bare model's state_dict
    path = tmp_path / 'checkpoint.pt'
    torch.save({'state_dict': {'module.' + k: v for k, v in eng.model.state_dict().items()}}, path)  # main.py's
    fresh = models.create_model('SLIP_TINY')
    state = torch.load(path, weights_only=True)['state_dict']
    fresh.load_state_dict({k.removeprefix('module.'): v for k, v in state.items()}, strict=True)
    assert list(fresh.state_dict()) == list(models.create_model('SLIP_TINY').state_dict())  # the released keys
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


# ----------------------------------------------------------------------------------------------------------------
# DDP around the compiled forward and loss (2 gloo processes)
# ----------------------------------------------------------------------------------------------------------------
def _dist_compiled_worker(rank, world_size):
    torch.manual_seed(0)
    model = models.create_model('CLIP_TINY').double()
    eng = _engine(model, 'CLIP_TINY', distributed=True, compile=True, compile_backend='aot_eager')
    local = make_batch('CLIP_TINY', 8, lengths=[2, 9, 30, 5, 17, 3, 12, 7]).chunk(world_size)[rank]
    local = local.apply(lambda t: t.double() if t.is_floating_point() else t)
    metrics, outcome = eng.forward_backward([local])
    return {'grads': {n: p.grad for n, p in model.named_parameters()}, 'nonfinite': float(outcome[0])}


@pytest.mark.dist
def test_ddp_over_the_compiled_step_equals_one_eager_process(gloo_run):
    """DDP wraps the module that torch.compile wraps (its DDPOptimizer splits the graph at the gradient buckets):
    two ranks' synchronised gradients equal one eager process's on the whole batch (float64, 1e-10)."""
    got = gloo_run(_dist_compiled_worker)[0]
    torch.manual_seed(0)
    model = models.create_model('CLIP_TINY').double()
    data = make_batch('CLIP_TINY', 8, lengths=[2, 9, 30, 5, 17, 3, 12, 7])
    _engine(model, 'CLIP_TINY').forward_backward([data.apply(lambda t: t.double() if t.is_floating_point() else t)])
    assert got['nonfinite'] == 0
    for n, p in model.named_parameters():
        torch.testing.assert_close(got['grads'][n], p.grad, rtol=1e-10, atol=1e-14, msg=n)


def test_a_remade_sample_with_a_longer_caption_widens_the_cut_batch():
    """device_decode replaces a bad image's sample in the main process: its caption may need more columns than the
    collate kept, and then the batch gets all 77 back (else the text fits as it is)."""
    import device_decode
    batch = augment.Batch(text=tokens([3, 5])[:, :8])
    device_decode._fit_text(batch, tokens([6])[0])
    assert batch.text.shape == (2, 8)
    device_decode._fit_text(batch, tokens([20])[0])
    assert torch.equal(batch.text, tokens([3, 5]))


# ----------------------------------------------------------------------------------------------------------------
# --compile-mode (reduce-overhead: CUDA graphs, measured by bench_gpu.sh)
# ----------------------------------------------------------------------------------------------------------------
def test_compile_mode_reaches_torch_compile_and_needs_inductor(monkeypatch):
    seen = []
    monkeypatch.setattr(torch, 'compile', lambda module, **kw: seen.append(kw) or module)
    _engine(models.create_model('CLIP_TINY'), 'CLIP_TINY', compile=True, compile_mode='reduce-overhead')
    _engine(models.create_model('CLIP_TINY'), 'CLIP_TINY', compile=True)
    assert seen[0]['mode'] == 'reduce-overhead' and seen[0]['fullgraph'] and 'mode' not in seen[1]
    with pytest.raises(ValueError, match='needs the inductor backend'):
        _engine(models.create_model('CLIP_TINY'), 'CLIP_TINY', compile=True, compile_backend='eager',
                compile_mode='reduce-overhead')
    with pytest.raises(ValueError, match='--compile-mode must be one of'):
        _engine(models.create_model('CLIP_TINY'), 'CLIP_TINY', compile=True, compile_mode='fast')


def test_cuda_graph_steps_keep_exact_accumulation_exact():
    """What the engine does differently under CUDA graphs (a generation mark per step, copies of the towers' outputs
    kept across micro-batches), forced on here over an 'eager'-compiled step: the same parameters after two steps of
    2 micro-batches as without (bitwise: the copies change no number)."""
    results = []
    for cuda_graphs in (False, True):
        torch.manual_seed(0)
        model = models.create_model('SLIP_TINY')
        eng = _engine(model, 'SLIP_TINY', 2, compile=True, compile_backend='eager')
        eng.cuda_graphs = cuda_graphs
        for seed in range(2):
            eng.step(make_batch('SLIP_TINY', 4, seed=seed).chunk(2))
        results.append(model.state_dict())
    for k, v in results[0].items():
        assert torch.equal(v, results[1][k]), k
