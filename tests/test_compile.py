"""The step without host syncs and its whole-graph compile (issue 23): the padded text path against the packed one,
the collate's text length, zero graph breaks, compiled equals eager, recompiles per length bucket, no device reads
inside a step, and checkpoints of a compiled engine. CPU only: compiled runs use the 'eager' / 'aot_eager' backends
(inductor's CPU compile is too slow for the suite); what they test is the capture, which every backend shares."""
import contextlib
import dataclasses

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

import augment
import engine as engine_lib
import models

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
