"""bench.py runs both modes and reports comparable figures (timings themselves are not asserted)."""
import argparse
import json
import os

import pytest
import torch

import bench
import bench_original


def parse(*argv):
    return argparse.ArgumentParser(parents=[bench.get_args_parser()]).parse_args([str(a) for a in argv])


def test_train_compare_prints_rows_and_json(capsys):
    rows = bench.main(parse('train', '--model', 'SLIP_TINY', '--batch-size', 4, '--device', 'cpu', '--steps', 1,
                            '--precision', 'fp32', '--compare', '--count-flops', '--warmup', 1))
    assert [r['config'] for r in rows] == ['baseline', 'fast']
    baseline, fast = rows
    assert fast['gflops_per_step'] < baseline['gflops_per_step']  # text truncation really skips work
    assert all(r['samples_per_s'] > 0 and r['step_s_median'] > 0 for r in rows)
    out = capsys.readouterr().out
    assert 'speed-up of fast over baseline' in out
    assert [json.loads(line)['config'] for line in out.splitlines() if line.startswith('{')] == ['baseline', 'fast']


def test_train_rows_carry_nominal_flops_first_step_time_and_a_torch_profile(capsys):
    rows = bench.main(parse('train', '--model', 'CLIP_TINY', '--batch-size', 4, '--device', 'cpu', '--steps', 1,
                            '--precision', 'fp32', '--compare', '--count-flops', '--warmup', 1, '--torch-profile', 5))
    baseline, fast = rows
    # nominal: 77-token captions and the full last block whatever the configuration runs, so the baseline's own count
    assert fast['nominal_gflops_per_step'] == baseline['nominal_gflops_per_step'] == baseline['gflops_per_step']
    assert fast['gflops_per_step'] < fast['nominal_gflops_per_step']
    assert all(r['first_step_s'] > 0 and r['compiled'] is False for r in rows)
    assert all(any('aten::' in line for line in r['torch_profile']) for r in rows)
    assert 'fast: torch.profiler, top operators:' in capsys.readouterr().out


def test_train_compare_compile_times_the_fast_step_eager_and_compiled(monkeypatch):
    real = torch.compile
    monkeypatch.setattr(torch, 'compile', lambda module, **kw: real(module, **{**kw, 'backend': 'eager'}))  # quick
    rows = bench.main(parse('train', '--model', 'CLIP_TINY', '--batch-size', 4, '--device', 'cpu', '--steps', 1,
                            '--precision', 'fp32', '--warmup', 1, '--compare-compile'))
    assert [(r['config'], r['compiled']) for r in rows] == [('fast', False), ('fast+compile', True)]
    assert 'compile_s' not in rows[0] and rows[1]['compile_s'] > 0 and rows[1]['compile_mode'] == 'default'


def test_train_compare_accum_runs_k_micro_batches_against_one_big_batch():
    rows = bench.main(parse('train', '--model', 'SLIP_TINY', '--batch-size', 2, '--update-freq', 3, '--device', 'cpu',
                            '--steps', 1, '--precision', 'fp32', '--compare-accum', '--count-flops', '--warmup', 0))
    accum, big, legacy = rows
    assert [r['config'] for r in rows] == ['exact 3x2', 'batch 6', 'legacy 3x2']
    assert (accum['batch_size'], accum['update_freq'], big['batch_size'], big['update_freq']) == (2, 3, 6, 1)
    # exact accumulation runs the towers forward twice: more FLOPs for the same 6 samples, less than twice as many
    assert big['gflops_per_step'] < accum['gflops_per_step'] < 2 * big['gflops_per_step']
    assert legacy['gflops_per_step'] < accum['gflops_per_step']
    assert all(r['peak_rss_gb'] > 0 and r['ms_per_sample'] > 0 for r in rows)


def test_data_compare_on_generated_yfcc_archives(tmp_path, capsys):
    rows = bench.main(parse('data', '--dataset', 'yfcc15m', '--root', tmp_path, '--metadata', tmp_path / 'm.pkl',
                            '--model', 'SLIP_TINY', '--num-samples', 8, '--make-fixture', '--fixture-archive-size', 16,
                            '--compare', '--device-augment', '--device', 'cpu', '--stages', '--profile', 5))
    assert [r['config'] for r in rows] == ['original', 'fast', 'fast+device_augment']
    assert all(r['samples_per_s'] > 0 and r['num_samples'] == 8 and r['host_cpu_s_per_sample'] > 0 for r in rows)
    assert rows[0]['device_ms_per_sample'] is None and rows[2]['device_ms_per_sample'] > 0
    assert (tmp_path / 'images' / '00' / '000.zip').exists()
    fast = rows[1]
    assert {'read', 'decode', 'clip_crop_resize', 'ssl_crop_resize', 'to_uint8', 'tokenize'} <= set(fast['stages_ms'])
    assert len(fast['profile']) == 6 and fast['profile'][0].split()[:2] == ['ncalls', 'tottime']
    out = capsys.readouterr().out
    assert 'speed-up of fast over original' in out and 'host CPU per sample' in out and 'by stage' in out


def test_original_yfcc_samples_are_the_originals_tuples(tmp_path):
    bench.make_yfcc_fixture(str(tmp_path), str(tmp_path / 'm.pkl'), 4, per_zip=4, size=(120, 90))
    ds = bench_original.OriginalYFCC(str(tmp_path), str(tmp_path / 'm.pkl'), 'slip', 64)
    assert ds.load(3).size == (120, 90) and ds.load(3).mode == 'RGB'
    image, text, aug1, aug2 = ds[2]
    assert image.shape == aug1.shape == aug2.shape == (3, 64, 64) and image.dtype == torch.float32
    assert image.mean().abs() < 3 and not torch.equal(aug1, aug2)  # ImageNet-normalised, two different views
    assert text.shape == (77,) and text[0] == 49406 and text.argmax() > 0
    assert len(bench_original.OriginalYFCC(str(tmp_path), str(tmp_path / 'm.pkl'), 'clip', 64)[0]) == 2


def test_original_tokenizer_is_clips_and_loses_the_end_token_of_long_captions():
    tok = bench_original.OriginalTokenizer()
    assert tok('a photo of a dog.')[:9].tolist() == [49406, 320, 1125, 539, 320, 1929, 269, 49407, 0]
    assert tok('').tolist()[:3] == [49406, 49407, 0]
    long = tok('dog ' * 100)
    assert long.shape == (77,) and 49407 not in long.tolist()  # cut by slicing, as the original does
    assert tok(['a', 'b']).shape == (2, 77)


def test_attention_mode_times_timms_layout_against_split_heads():
    rows = bench.main(parse('attention', '--model', 'CLIP_TINY', '--batch-size', 2, '--device', 'cpu', '--steps', 3,
                            '--warmup', 1, '--precision', 'fp32'))
    assert [r['layout'] for r in rows] == ['timm', 'split_heads']
    assert rows[0]['tokens'] == 65  # 64 px / patch 8 = 64 patches + the class token
    assert rows[0]['time_vs_timm'] == 1.0
    assert rows[1]['time_vs_timm'] == rows[1]['fwd_bwd_ms_median'] / rows[0]['fwd_bwd_ms_median']


def test_head_mode_measures_each_accumulated_batch_and_fits_the_largest(capsys):
    rows = bench.main(parse('head', '--model', 'SLIP_TINY', '--head-batches', '64,128,256', '--device', 'cpu',
                            '--precision', 'fp32', '--memory-gb', 1))
    assert [r['batch_size'] for r in rows] == [64, 128, 256] and all(r['mode'] == 'head' for r in rows)
    assert all(r['step_s_median'] > 0 for r in rows) and 'GB holds N ~' in capsys.readouterr().out


@pytest.mark.slow  # three fresh interpreters
def test_metadata_memory_mode_compares_python_lists_and_compact_cache(tmp_path):
    rows = bench.main(parse('data', '--metadata-memory', '--root', tmp_path, '--metadata', tmp_path / 'yfcc15m.pkl',
                            '--metadata-records', 3000, '--worker-seconds', 0.5, '--forked-workers', 2))
    assert [r['config'] for r in rows] == ['python_lists', 'compact_cold_cache', 'compact_warm_cache']
    assert all(r['records'] == 3000 and r['build_s'] > 0 and r['worker_records_read'] > 0 for r in rows)
    assert all(len(r['worker_trace']) == 2 for r in rows)  # one trace per forked worker
    assert rows[0]['cache_file_B_per_record'] is None and rows[2]['cache_file_B_per_record'] > 100
    assert [p for p in os.listdir(tmp_path / 'metadata_cache') if p.endswith('.slipmeta')]
