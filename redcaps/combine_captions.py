"""Merge RedCaps per-subreddit annotation files into the single list ``--dataset redcaps`` reads as ``--metadata``.

Usage:
    python redcaps/combine_captions.py --input /path/to/redcaps/annotations --output redcaps_v1.0_annotations.json

Every ``*.json`` file of ``--input`` (sorted by name, so the output is reproducible) is a RedCaps annotation file
``{"info": ..., "annotations": [{"image_id", "subreddit", "caption", ...}, ...]}``; their ``annotations`` lists are
concatenated and written, as one JSON list, atomically to ``--output``.
"""
import argparse
import json
import os
import sys
from typing import Any, Dict, List

if __package__ in (None, ''):  # run as a script (python redcaps/combine_captions.py): the repository root is above
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoints  # noqa: E402 (after the path, as a script)

REQUIRED_KEYS = ('image_id', 'subreddit', 'caption')  # what datasets.py needs of every annotation


def read_annotations(path: str) -> List[Dict[str, Any]]:
    """The ``annotations`` list of one RedCaps file; raises ValueError naming the file if it is malformed."""
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f'{path}: not valid JSON ({e})') from e
    anns = data.get('annotations') if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise ValueError(f"{path}: expected a JSON object with an 'annotations' list")
    for k, a in enumerate(anns):
        if not isinstance(a, dict) or any(key not in a for key in REQUIRED_KEYS):
            raise ValueError(f'{path}: annotation {k} lacks one of {REQUIRED_KEYS}: {str(a)[:200]}')
    return anns


def combine(input_dir: str) -> List[Dict[str, Any]]:
    """Concatenate the annotations of every ``*.json`` file in ``input_dir``, in file-name order."""
    if not os.path.isdir(input_dir):
        raise FileNotFoundError(f'--input {input_dir!r} is not a directory')
    names = sorted(n for n in os.listdir(input_dir) if n.endswith('.json'))
    if not names:
        raise FileNotFoundError(f'no .json annotation files in {input_dir!r}')
    combined: List[Dict[str, Any]] = []
    for name in names:
        combined.extend(read_annotations(os.path.join(input_dir, name)))
    return combined


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('Combine RedCaps annotation files', add_help=False)
    parser.add_argument('--input', required=True, help='directory of per-subreddit RedCaps annotation .json files')
    parser.add_argument('--output', required=True, help='JSON file to write (the --metadata of --dataset redcaps)')
    return parser


def main(args: argparse.Namespace) -> None:
    annotations = combine(args.input)
    with checkpoints.atomic_write(args.output, text=True) as f:
        json.dump(annotations, f)
    print(f'=> wrote {len(annotations)} annotations to {args.output}')


if __name__ == '__main__':
    parser = argparse.ArgumentParser('Combine RedCaps annotation files', parents=[get_args_parser()])
    args = parser.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    main(args)
