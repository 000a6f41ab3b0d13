"""eval_zeroshot.py and zeroshot.py, the library under it: metrics against hand-computed answers, classifier,
retrieval, checkpoints, JSON files, shards. The library is reached through eval_zeroshot's re-exports (``ez``), the
way code written against the script reaches it; a patch goes on ``zeroshot``, where the library looks its names up.
"""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import datasets
import eval_zeroshot as ez
import models
import zeroshot

COLORS = [(230, 30, 30), (30, 200, 40), (30, 60, 230)]
REFERENCE = os.path.join(os.path.dirname(__file__), 'data')  # the original's JSON files, to check ours against
# SLIP's labels.json / templates.json (tests/data): dataset -> (classes, templates), in catalog order.
PAPER_TABLE = {
    'food101': (101, 1), 'cifar10': (10, 18), 'cifar100': (100, 18), 'cub200': (200, 1), 'sun397': (397, 2),
    'cars': (196, 8), 'aircraft': (100, 2), 'dtd': (47, 8), 'pets': (37, 1), 'caltech101': (102, 34),
    'flowers': (102, 1), 'mnist': (10, 1), 'fer2013': (7, 6), 'stl10': (10, 2), 'eurosat': (10, 3),
    'resisc45': (45, 18), 'gtsrb': (43, 3), 'kitti_distance': (4, 1), 'country211': (211, 5),
    'patch_camelyon': (2, 1), 'ucf101_frames': (101, 48), 'kinetics700_frames': (700, 28), 'clevr_counts': (8, 1),
    'hateful_memes': (2, 1), 'rendered_sst2': (2, 1), 'imagenet': (1000, 7)}


def write_image(path, color, seed):
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(color)[None, None] + rng.integers(-20, 21, (64, 72, 3)), 0, 255).astype(np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path)
    return str(path)


def make_assets(root, n_per_class=(2, 3, 2)):
    """Imagefolder 'toy', filelist 'toylist' (same images), a missing dataset, labels and templates; returns paths."""
    paths, labels = [], []
    for c, n in enumerate(n_per_class):
        for i in range(n):
            paths.append(write_image(root / 'toy' / 'test' / f'c{c}' / f'{i}.png', COLORS[c], 10 * c + i))
            labels.append(c)
    np.save(root / 'test_images.npy', np.array(paths))
    np.save(root / 'test_labels.npy', np.array(labels))
    catalog = {'toy': {'path': str(root / 'toy'), 'type': 'imagefolder', 'train': 'train', 'test': 'test'},
               'toylist': {'path': str(root), 'type': 'filelist', 'train': 'train', 'test': 'test'},
               'gone': {'path': str(root / 'nowhere'), 'type': 'imagefolder', 'train': 'train', 'test': 'test'}}
    names = ['red', 'green', 'blue']
    files = {'catalog': catalog, 'labels': {k: names for k in catalog},
             'templates': {k: ['a photo of {}.', 'a {} thing.'] for k in catalog}}
    for key, data in files.items():
        (root / f'{key}.json').write_text(json.dumps(data))
    return {k: str(root / f'{k}.json') for k in files}


@pytest.fixture(scope='module')
def tiny_model():
    torch.manual_seed(0)
    return models.create_model('SLIP_TINY').eval()


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------
def one_hot_logits(preds, n_classes):
    return F.one_hot(torch.tensor(preds), n_classes).float()


def test_top1_and_mean_per_class_hand_computed():
    targets = torch.tensor([0, 0, 0, 1, 2, 2])
    logits = one_hot_logits([0, 0, 1, 1, 2, 0], 3)
    assert ez.classification_metrics(logits, targets, 'top1')['metric'] == pytest.approx(400 / 6, abs=1e-4)
    # class 0: 2/3, class 1: 1/1, class 2: 1/2
    expected = (2 / 3 + 1 + 1 / 2) / 3 * 100
    assert ez.classification_metrics(logits, targets, 'mean_per_class')['metric'] == pytest.approx(expected, abs=1e-4)
    # a class that is only predicted, never a target, does not enter the average
    assert ez.mean_per_class_accuracy(torch.tensor([3, 0]), torch.tensor([0, 0])) == pytest.approx(50.0)


def test_kinetics_metric_is_mean_of_top1_and_top5():
    # 4 samples, 7 classes; ranks of the true class: 1, 3, 6, 7 -> top-1 1/4, top-5 2/4
    targets = torch.tensor([0, 0, 0, 0])
    logits = torch.tensor([[9., 1, 2, 3, 4, 5, 6], [5., 9, 8, 1, 2, 3, 4], [2., 9, 8, 7, 6, 5, 1],
                           [0., 1, 2, 3, 4, 5, 6]])
    m = ez.classification_metrics(logits, targets, 'top1_top5')
    assert (m['acc1'], m['acc5']) == pytest.approx((25.0, 50.0))
    assert m['metric'] == pytest.approx(37.5)


def pairwise_auc(scores, labels):
    pos, neg = scores[labels == 1], scores[labels == 0]
    return 100 * sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def test_roc_auc_hand_computed_with_ties():
    assert ez.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(75.0)
    # ties between classes count one half: pairs (0.5 vs 0.5) x2 -> 1, (0.9 vs 0.5) x2 -> 2; 3 / 4
    assert ez.roc_auc([0.5, 0.5, 0.5, 0.9], [0, 1, 0, 1]) == pytest.approx(75.0)
    assert ez.roc_auc([1.0, 1.0, 1.0], [0, 1, 1]) == pytest.approx(50.0)
    assert np.isnan(ez.roc_auc([0.2, 0.3], [1, 1]))
    rng = np.random.default_rng(0)
    scores, labels = rng.integers(0, 6, 200).astype(float), rng.integers(0, 2, 200)  # many ties
    assert ez.roc_auc(scores, labels) == pytest.approx(pairwise_auc(scores, labels))
    # hateful_memes: score = logit[:, 1] - logit[:, 0]
    logits = torch.tensor([[0.3, 0.1], [0.2, 0.4], [0.5, 0.5], [0.0, 0.9]])
    got = ez.classification_metrics(logits, torch.tensor([0, 0, 1, 1]), 'roc_auc')['metric']
    assert got == pytest.approx(pairwise_auc(np.array([-0.2, 0.2, 0.0, 0.9]), np.array([0, 0, 1, 1])))


def brute_force_recall(img, txt, owner, k):
    sims = (img @ txt.T).numpy()
    i2t = np.mean([any(owner[t] == i for t in np.argsort(-sims[i])[:k]) for i in range(len(img))])
    t2i = np.mean([owner[t] in np.argsort(-sims[:, t])[:k] for t in range(len(txt))])
    return 100 * t2i, 100 * i2t


def test_recall_at_k_matches_brute_force():
    torch.manual_seed(0)
    n_img = 12
    owner = np.random.default_rng(0).permutation(np.repeat(np.arange(n_img), 5))  # 5 captions per image, shuffled
    img = F.normalize(torch.randn(n_img, 8), dim=-1)
    txt = F.normalize(img[owner] + 0.9 * torch.randn(len(owner), 8), dim=-1)  # noisy: recalls between 0 and 100
    got = ez.retrieval_recall(img, txt, owner.tolist(), chunk=5)  # small chunks: exercise the chunking
    values = []
    for k in (1, 5, 10):
        t2i, i2t = brute_force_recall(img, txt, owner, k)
        assert got[f'image_retrieval_recall@{k}'] == pytest.approx(t2i)
        assert got[f'text_retrieval_recall@{k}'] == pytest.approx(i2t)
        values += [t2i, i2t]
    assert 0 < min(values) < 100


# ----------------------------------------------------------------------------------------------------------------
# Classifier, assets
# ----------------------------------------------------------------------------------------------------------------
def test_classifier_averages_prompts_and_synonyms(tiny_model, tokenizer):
    templates = ['a photo of a {} face.', 'they look {}.']
    classes = [['angry'], ['happy', 'smiling'], 'neutral']
    clf = ez.build_classifier(tiny_model, tokenizer, classes, templates, torch.device('cpu'))
    assert clf.shape == (3, 64)
    with torch.no_grad():
        def expected(names):
            prompts = [t.format(n) for t in templates for n in names]
            return F.normalize(F.normalize(tiny_model.encode_text(tokenizer(prompts)), dim=-1).mean(0), dim=0)
        for row, names in zip(clf, [['angry'], ['happy', 'smiling'], ['neutral']], strict=True):
            torch.testing.assert_close(row, expected(names), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(clf[1], expected(['happy']), atol=1e-3)  # both synonyms count


def test_shipped_json_files_match_the_reference():
    catalog, labels, templates = ez.load_assets()
    assert list(catalog)[:26] == ez.PAPER_DATASETS == list(PAPER_TABLE)
    for name, (n_classes, n_templates) in PAPER_TABLE.items():
        assert (len(labels[name]), len(templates[name])) == (n_classes, n_templates), name
    with open(f'{REFERENCE}/slip_labels.json') as f:
        ref_labels = json.load(f)
    with open(f'{REFERENCE}/slip_templates.json') as f:
        ref_templates = json.load(f)
    with open(f'{REFERENCE}/slip_dataset_catalog.json') as f:
        ref_catalog = json.load(f)
    assert list(labels)[:len(ref_labels)] == list(ref_labels) and all(labels[k] == v for k, v in ref_labels.items())
    assert all(templates[k] == v for k, v in ref_templates.items())
    assert all(catalog[k] == v for k, v in ref_catalog.items())
    assert labels['fer2013'][3] == ['happy', 'smiling'] and len(templates['imagenet']) == 7
    assert len(set(templates['imagenet_80'])) == 80 and all(t.count('{}') == 1 for t in templates['imagenet_80'])
    assert labels['demo'] == datasets.DEMO_CLASSNAMES and templates['demo'] == datasets.DEMO_TEMPLATES
    for name in catalog:  # every classification entry resolves to labels and templates
        base, entry = ez.resolve_entry(catalog, name)
        if not entry['type'].startswith('retrieval'):
            assert entry.get('labels', base) in labels and entry.get('templates', base) in templates, name


def test_load_assets_names_the_bad_file(tmp_path):
    bad = tmp_path / 'labels.json'
    bad.write_text('{"a": [1, 2,,]}')
    with pytest.raises(ValueError, match='labels.json'):
        ez.load_assets(labels_path=str(bad))
    bad.write_text('[1, 2]')
    with pytest.raises(ValueError, match='JSON object'):
        ez.load_assets(labels_path=str(bad))
    with pytest.raises(FileNotFoundError, match='nope.json'):
        ez.load_assets(catalog_path=str(tmp_path / 'nope.json'))


# ----------------------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------------------
def eval_args(tmp_path, files, ckpt, names):
    return ez.get_args_parser().parse_args([
        '--resume', str(ckpt), '--datasets', *names, '--catalog', files['catalog'], '--labels', files['labels'],
        '--templates', files['templates'], '--output-dir', str(tmp_path / 'out'), '-j', '0', '--device', 'cpu'])


def test_released_checkpoint_end_to_end(tmp_path, tokenizer, released_checkpoint):
    files = make_assets(tmp_path)
    model = released_checkpoint(tmp_path / 'slip_tiny.pt', name='CLIP_SIMCLR_TINY')  # the pre-release SLIP name
    results = ez.main(eval_args(tmp_path, files, tmp_path / 'slip_tiny.pt', ['toy', 'gone', 'toylist']))
    with open(tmp_path / 'out' / 'zeroshot_results.json') as f:
        assert json.load(f) == results
    assert results['gone'] is None  # missing: reported, and the others still ran
    # the loaded checkpoint gives what the in-memory model gives, and filelist == imagefolder on the same images
    assets = ez.load_assets(files['catalog'], files['labels'], files['templates'])
    model.train()
    direct = ez.zeroshot_dataset(model, 'toy', assets, tokenizer, torch.device('cpu'), batch_size=3, workers=0)
    assert model.training  # mode restored
    assert results['toy'] == pytest.approx(direct['metric']) == pytest.approx(results['toylist'])
    # and it is the top-1 of cosine logits, computed here by hand
    clf = ez.build_classifier(model, tokenizer, ['red', 'green', 'blue'], ['a photo of {}.', 'a {} thing.'], 'cpu')
    ds = datasets.get_downstream_dataset(assets[0], 'toy', False, ez.eval_transform(64))
    with torch.no_grad():
        preds = [int((model.eval().encode_image(x[None]) @ clf.T).argmax()) for x, _ in ds]
    assert results['toy'] == pytest.approx(100 * np.mean([p == y for p, (_, y) in zip(preds, ds.samples, strict=True)]))


def test_simclr_checkpoint_gets_a_clear_message(tmp_path, released_checkpoint):
    files = make_assets(tmp_path)
    released_checkpoint(tmp_path / 'simclr.pt', name='SIMCLR_TINY')
    with pytest.raises(ValueError, match='SimCLR model without a text encoder'):
        ez.main(eval_args(tmp_path, files, tmp_path / 'simclr.pt', ['toy']))


def test_retrieval_karpathy_and_coco_formats(tmp_path, tiny_model, tokenizer, monkeypatch):
    rows, annotations, images = [], [], []
    for i, color in enumerate(COLORS):
        write_image(tmp_path / 'imgs' / f'{i}.jpg', color, i)
        caps = [f'a {n} image number {i} {j}' for j, n in enumerate(['red', 'green', 'blue', 'dark', 'bright', 'x'])]
        rows.append({'filename': f'{i}.jpg', 'split': 'test', 'sentences': [{'raw': c} for c in caps]})
        images.append({'id': 10 + i, 'file_name': f'{i}.jpg'})
        annotations += [{'image_id': 10 + i, 'caption': c} for c in caps]
    rows.append({'filename': 'not_in_split.jpg', 'split': 'train', 'sentences': [{'raw': 'x'}]})
    (tmp_path / 'karpathy.json').write_text(json.dumps({'images': rows}))
    (tmp_path / 'coco.json').write_text(json.dumps({'images': images[::-1], 'annotations': annotations}))
    catalog = {'k': {'path': str(tmp_path), 'type': 'retrieval_karpathy', 'images': 'imgs', 'captions': 'karpathy.json',
                     'split': 'test'},
               'c': {'path': str(tmp_path), 'type': 'retrieval_coco', 'images': 'imgs', 'captions': 'coco.json'},
               'none': {'path': str(tmp_path / 'x'), 'type': 'retrieval_coco', 'images': '', 'captions': 'a.json'}}
    paths, captions = ez.load_retrieval_split('k', catalog['k'])
    assert [os.path.basename(p) for p in paths] == ['0.jpg', '1.jpg', '2.jpg']
    assert [len(c) for c in captions] == [5, 5, 5] and captions[1][0] == 'a red image number 1 0'
    assert (paths, captions) == ez.load_retrieval_split('c', catalog['c'])
    seen = []
    recall = ez.retrieval_recall
    monkeypatch.setattr(zeroshot, 'retrieval_recall', lambda img, txt, owner: seen.append((img, txt, owner)) or
                        recall(img, txt, owner))
    results = [ez.zeroshot_dataset(tiny_model, n, (catalog, {}, {}), tokenizer, 'cpu', 2, 0) for n in ('k', 'c')]
    assert results[0] == results[1]
    img, txt, owner = seen[0]
    assert img.shape[0] == 3 and txt.shape[0] == 15 and owner == [0] * 5 + [1] * 5 + [2] * 5  # caption -> its image
    t2i, i2t = brute_force_recall(img, txt, owner, 1)  # the model's features, scored by hand
    assert results[0]['image_retrieval_recall@1'] == pytest.approx(t2i)
    assert results[0]['text_retrieval_recall@1'] == pytest.approx(i2t)
    assert results[0]['metric'] == pytest.approx(np.mean([v for k, v in results[0].items() if '@' in k]))
    with pytest.raises(datasets.DatasetMissing):
        ez.zeroshot_dataset(tiny_model, 'none', (catalog, {}, {}), tokenizer, 'cpu', 2, 0)


def test_demo_dataset_top1_and_top5_of_its_logits(tiny_model, tokenizer, monkeypatch):
    catalog, labels, templates = ez.load_assets()
    catalog = {**catalog, 'demo': {**catalog['demo'], 'size': 96}}  # 3 images per class
    seen = []
    metrics = ez.classification_metrics
    monkeypatch.setattr(zeroshot, 'classification_metrics', lambda logits, targets, metric: seen.append(
        (logits, targets, metric)) or metrics(logits, targets, metric))
    stats = ez.zeroshot_dataset(tiny_model, 'demo', (catalog, labels, templates), tokenizer, 'cpu', 256, 0)
    logits, targets, metric = seen[0]
    assert logits.shape == (96, 32) and targets.tolist() == [i % 32 for i in range(96)] and metric == 'top1'
    top5 = logits.topk(5, dim=1).indices
    assert stats['acc1'] == pytest.approx(100 * (logits.argmax(1) == targets).float().mean().item())
    assert stats['acc5'] == pytest.approx(100 * (top5 == targets[:, None]).any(1).float().mean().item())
    assert stats['metric'] == stats['acc1']


# ----------------------------------------------------------------------------------------------------------------
# Two processes: disjoint shards without padding, gathered -> the exact single-process answer
# ----------------------------------------------------------------------------------------------------------------
def _sharded_worker(rank, world, init_file, files, out_file, tokenizer):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    torch.manual_seed(0)
    model = models.create_model('SLIP_TINY')
    assets = ez.load_assets(files['catalog'], files['labels'], files['templates'])
    stats = ez.zeroshot_dataset(model, 'toy', assets, tokenizer, torch.device('cpu'), 2, 0)
    rows = ez.gather_shards(torch.arange(rank, 7, world), 7)  # uneven shards: 4 and 3 rows
    if rank == 0:
        torch.save({'stats': stats, 'rows': rows}, out_file)
    dist.destroy_process_group()


@pytest.mark.dist
def test_two_process_sharded_eval_equals_single_process(tmp_path, tokenizer):
    files = make_assets(tmp_path, n_per_class=(3, 2, 2))  # 7 images
    # fork: the children reuse the parent's imports and tokenizer (a spawn re-imports everything, ~10 s per child)
    torch.multiprocessing.start_processes(
        _sharded_worker, args=(2, str(tmp_path / 'init'), files, str(tmp_path / 'o.pt'), tokenizer), nprocs=2,
        start_method='fork')
    out = torch.load(tmp_path / 'o.pt')
    assert out['rows'].tolist() == list(range(7))
    torch.manual_seed(0)
    model = models.create_model('SLIP_TINY')
    assets = ez.load_assets(files['catalog'], files['labels'], files['templates'])
    single = ez.zeroshot_dataset(model, 'toy', assets, tokenizer, torch.device('cpu'), 2, 0)
    assert out['stats'] == pytest.approx(single, abs=1e-6)
