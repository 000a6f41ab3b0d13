"""Build the YFCC15M pre-training metadata (``yfcc15m.pkl``) and the list of downloaded ids (``yfcc100m.pkl``).

Usage:
    python make_dataset.py --ids flickr_unique_ids.npy --subset yfcc100m_subset_data.tsv \
        --metadata yfcc100m_dataset.txt --output-dir ./

Inputs (as in SLIP's README, github.com/facebookresearch/SLIP): ``--ids`` the YFCC100M photo ids whose images you have
(npy), ``--subset`` OpenAI's 15M-subset list (tab-separated, photo id in the first column), ``--metadata`` the
YFCC100M metadata dump (tab-separated; column 0 photo id, 8 title, 9 description). The dump is streamed line by line,
never read whole.
As in the original, the first column of both tsv files is the join key (OpenAI's subset lists the dump's first three
columns), and it is the id the image archives are named by.

Outputs: ``yfcc15m.pkl``, a list of ``(photo_id, title, description)`` with cleaned captions for the downloaded
images of the subset (``--dataset yfcc15m --metadata yfcc15m.pkl``), and ``yfcc100m.pkl``, the list of every
downloaded id found in the dump. Both are written atomically. With ``--metadata-cache DIR`` the compact form of
yfcc15m.pkl is written there too (what main.py ``--metadata-cache DIR`` would otherwise build at its first start).
"""
import argparse
import functools
import os
import pickle
import re
from typing import Iterable, List, Optional, Set, Tuple
from urllib.parse import unquote

import numpy as np

import checkpoints
import metadata
import progress

_HTML_TAGS = re.compile(r'<a\b[^>]*>|</a>|<b>|</b>|<i>|</i>', re.IGNORECASE)
_URLS = re.compile(r'(?:http|www)\S*')  # from http/www to the next space, as the original cleaning did
_SPACES = re.compile(r'\s+')


def clean_caption(text: str) -> str:
    """Clean a YFCC title or description: URL-unquote, '+' -> space, drop <a>/<b>/<i> tags and URLs.

    >>> clean_caption('Sunset+at+the+%3Cb%3Ebeach%3C%2Fb%3E+http%3A%2F%2Fx.org')
    'Sunset at the beach'
    """
    text = unquote(text).replace('+', ' ')  # unquote first: the dump percent-encodes the tags and URLs too
    text = _HTML_TAGS.sub('', text)
    text = _URLS.sub('', text)
    return _SPACES.sub(' ', text).strip()


def read_subset_ids(path: str) -> Set[int]:
    """Photo ids in the first tab-separated column of OpenAI's subset file (a header line is skipped)."""
    ids = set()
    with open(path) as f:
        for n, line in enumerate(f):
            first = line.split('\t', 1)[0].strip()
            if first.isdigit():
                ids.add(int(first))
            elif first and n > 0:
                raise ValueError(f'{path}:{n + 1}: expected a photo id in the first column, got {first[:40]!r}')
    return ids


def select_captions(lines: Iterable[str], downloaded: Set[int], subset: Set[int], source: str = '<metadata>',
                    counter: Optional[progress.Progress] = None) -> Tuple[List[Tuple[int, str, str]], List[int]]:
    """Pick the subset's downloaded photos from YFCC100M metadata lines (``counter`` counts the lines read).

    Returns:
        (captioned, downloaded_ids): ``(photo_id, clean title, clean description)`` for downloaded photos of the
        subset, and the id of every downloaded photo seen, both in file order.
    """
    captioned, seen = [], []
    for n, line in enumerate(lines):
        if counter is not None:
            counter.update()
        row = line.rstrip('\n').split('\t')
        if not row[0].strip():
            continue
        if len(row) < 10 or not row[0].isdigit():
            raise ValueError(f'{source}:{n + 1}: expected >= 10 tab-separated columns starting with a photo id, '
                             f'got {len(row)} column(s) starting {row[0][:40]!r}')
        photo_id = int(row[0])
        if photo_id not in downloaded:
            continue
        seen.append(photo_id)
        if photo_id in subset:
            captioned.append((photo_id, clean_caption(row[8]), clean_caption(row[9])))
            if counter is not None:
                counter.fields['kept'] = len(captioned)  # shown on the next progress line
    return captioned, seen


def _dump(obj, path: str) -> None:
    with checkpoints.atomic_write(path) as f:  # never leave a half-written file under the final name
        pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('Build yfcc15m.pkl / yfcc100m.pkl', add_help=False)
    parser.add_argument('--ids', default='flickr_unique_ids.npy', help='npy array of the downloaded photo ids')
    parser.add_argument('--subset', default='yfcc100m_subset_data.tsv', help="OpenAI's YFCC 15M subset (tsv)")
    parser.add_argument('--metadata', default='yfcc100m_dataset.txt', help='YFCC100M metadata dump (tsv)')
    parser.add_argument('--output-dir', default='./', help='where yfcc15m.pkl and yfcc100m.pkl are written')
    parser.add_argument('--metadata-cache', default=None,
                        help="also write yfcc15m.pkl's compact form to this folder (main.py's --metadata-cache)")
    return parser


def main(args: argparse.Namespace) -> None:
    for path in (args.ids, args.subset, args.metadata):
        if not os.path.isfile(path):
            raise FileNotFoundError(f'input file {path!r} not found')
    ids = np.load(args.ids, allow_pickle=False)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f'{args.ids}: expected a 1-D integer array of photo ids, got {ids.dtype} {ids.shape}')
    downloaded = set(ids.tolist())
    subset = read_subset_ids(args.subset)
    print(f'=> {len(downloaded)} downloaded ids, {len(subset)} ids in the subset')
    say = functools.partial(print, flush=True)  # flushed: Slurm's output is a file, block-buffered otherwise
    with open(args.metadata, encoding='utf-8', errors='replace') as f, progress.Progress(
            'make_dataset', unit='lines', size=os.path.getsize(args.metadata), position=f.buffer.tell, log=say) as c:
        c.fields['kept'] = 0
        captioned, seen = select_captions(f, downloaded, subset, args.metadata, c)
    _dump(captioned, os.path.join(args.output_dir, 'yfcc15m.pkl'))
    _dump(seen, os.path.join(args.output_dir, 'yfcc100m.pkl'))
    if args.metadata_cache:
        out = os.path.join(args.output_dir, 'yfcc15m.pkl')
        target = metadata.cache_path(args.metadata_cache, 'yfcc15m', out)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        metadata.write_cache(target, metadata.CompactMetadata.from_records('yfcc15m', captioned, out),
                             metadata.source_key('yfcc15m', out))
        print(f'=> compact metadata: {target}')
    print(f'=> captioned images: {len(captioned)}; downloaded images in the metadata: {len(seen)}')


if __name__ == '__main__':
    parser = argparse.ArgumentParser('Build yfcc15m.pkl / yfcc100m.pkl', parents=[get_args_parser()])
    args = parser.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    main(args)
