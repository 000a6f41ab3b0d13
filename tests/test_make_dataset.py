"""Data-preparation scripts: make_dataset.py (YFCC15M metadata) and redcaps/combine_captions.py."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import make_dataset
import metadata
from redcaps import combine_captions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('raw,clean', [
    ('Sunset+at+the+beach', 'Sunset at the beach'),
    ('caf%C3%A9+%26+bar', 'café & bar'),
    ('%3Ca+href%3D%22http%3A%2F%2Fx.org%22%3Emy+site%3C%2Fa%3E', 'my site'),
    ('<b>bold</b> and <i>italic</i>', 'bold and italic'),
    ('see http://flickr.com/x and www.example.org/page now', 'see and now'),
    ('1%2B1', '1 1'),  # unquoted first, then '+' -> space, as the original did
    ('<abbr>kept</abbr> <a>gone</a>', '<abbr>kept</abbr> gone'),  # only <a ...>, not any tag starting with a
    ('+++', ''),
])
def test_clean_caption(raw, clean):
    assert make_dataset.clean_caption(raw) == clean


def _metadata_line(photo_id, title, desc):
    cols = [str(photo_id), 'hash', 'user', 'nick', 'date', 'date', 'device', 'x', title, desc, 'tags']
    return '\t'.join(cols) + '\n'


def _inputs(tmp_path):
    ids = tmp_path / 'ids.npy'
    np.save(ids, np.array([1, 2, 3, 5], dtype=np.int64))
    subset = tmp_path / 'subset.tsv'
    subset.write_text('line\tphotoid\thash\n1\t10\th\n3\t30\th\n4\t40\th\n')
    meta = tmp_path / 'yfcc100m_dataset.txt'
    meta.write_text(_metadata_line(3, 'Three+%3Cb%3Ebold%3C%2Fb%3E', 'www.x.com desc') + _metadata_line(1, 'One', '')
                    + _metadata_line(2, 'Two', 'not in subset') + _metadata_line(4, 'Four', 'not downloaded'))
    return ids, subset, meta


def test_make_dataset_writes_both_pickles(tmp_path):
    ids, subset, meta = _inputs(tmp_path)
    out = tmp_path / 'out'
    out.mkdir()
    args = make_dataset.get_args_parser().parse_args(
        ['--ids', str(ids), '--subset', str(subset), '--metadata', str(meta), '--output-dir', str(out)])
    make_dataset.main(args)
    with open(out / 'yfcc15m.pkl', 'rb') as f:
        assert pickle.load(f) == [(3, 'Three bold', 'desc'), (1, 'One', '')]  # file order; the loader's format
    with open(out / 'yfcc100m.pkl', 'rb') as f:
        assert pickle.load(f) == [3, 1, 2]
    assert not [p for p in os.listdir(out) if p.endswith('.tmp')]


def test_make_dataset_writes_the_compact_form_that_the_loader_then_maps(tmp_path, monkeypatch):
    ids, subset, meta = _inputs(tmp_path)
    cache = tmp_path / 'cache'
    make_dataset.main(make_dataset.get_args_parser().parse_args(
        ['--ids', str(ids), '--subset', str(subset), '--metadata', str(meta), '--output-dir', str(tmp_path),
         '--metadata-cache', str(cache)]))
    monkeypatch.setattr(metadata, 'parse_metadata', lambda *a: pytest.fail('the cache should have been used'))
    compact = metadata.load_metadata('yfcc15m', str(tmp_path / 'yfcc15m.pkl'), str(cache))
    assert compact.origin is not None and [compact[0], compact[1]] == [(3, 'Three bold', 'desc'), (1, 'One', '')]

def test_make_dataset_rejects_bad_inputs_naming_them(tmp_path):
    ids, subset, meta = _inputs(tmp_path)
    parser = make_dataset.get_args_parser()
    argv = ['--ids', str(ids), '--subset', str(subset), '--metadata', str(meta), '--output-dir', str(tmp_path)]
    with pytest.raises(FileNotFoundError, match='nothing.npy'):
        make_dataset.main(parser.parse_args(argv[:1] + [str(tmp_path / 'nothing.npy')] + argv[2:]))
    meta.write_text(_metadata_line(1, 'One', 'x') + 'not\ta\tmetadata\tline\n')
    with pytest.raises(ValueError, match=r'yfcc100m_dataset.txt:2: expected >= 10 tab-separated columns'):
        make_dataset.main(parser.parse_args(argv))
    subset.write_text('line\tphotoid\n1\t10\nabc\t20\n')
    with pytest.raises(ValueError, match=r'subset.tsv:3'):
        make_dataset.main(parser.parse_args(argv))


def _annotation_file(path, subreddit, n):
    anns = [{'image_id': f'{subreddit}{k}', 'author': 'u', 'url': 'http://i.redd.it/x.jpg', 'raw_caption': 'R',
             'caption': f'{subreddit} caption {k}', 'subreddit': subreddit, 'score': 1, 'created_utc': 0}
            for k in range(n)]
    path.write_text(json.dumps({'info': {'subreddit': subreddit}, 'annotations': anns}))


def test_combine_captions_concatenates_in_name_order(tmp_path):
    src = tmp_path / 'annotations'
    src.mkdir()
    _annotation_file(src / 'pics_2020.json', 'pics', 2)
    _annotation_file(src / 'earthporn_2019.json', 'earthporn', 1)
    (src / 'README.txt').write_text('not an annotation file')
    out = tmp_path / 'sub' / 'redcaps.json'
    # through the command line, as the README runs it (also covers the __main__ guard creating the output dir)
    subprocess.run([sys.executable, os.path.join(ROOT, 'redcaps', 'combine_captions.py'), '--input', str(src),
                    '--output', str(out)], check=True, capture_output=True)
    combined = json.loads(out.read_text())
    assert [a['image_id'] for a in combined] == ['earthporn0', 'pics0', 'pics1']
    assert combined[1]['caption'] == 'pics caption 0' and combined[1]['subreddit'] == 'pics'


def test_combine_captions_rejects_malformed_files(tmp_path):
    (tmp_path / 'a.json').write_text(json.dumps([{'image_id': 'x'}]))
    with pytest.raises(ValueError, match=r"a\.json: expected a JSON object with an 'annotations' list"):
        combine_captions.combine(str(tmp_path))
    (tmp_path / 'a.json').write_text(json.dumps({'annotations': [{'image_id': 'x', 'caption': 'c'}]}))
    with pytest.raises(ValueError, match=r'a\.json: annotation 0 lacks'):
        combine_captions.combine(str(tmp_path))
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match='no .json annotation files'):
        combine_captions.combine(str(empty))
