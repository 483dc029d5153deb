"""Score a trained InstaGAN on a phase with instance masks, in both directions.

    python evaluate.py --model-save-path results/models --dataroot datasets/jeans2skirt_ccp \\
        --phase test [--json] [--out results/evaluate/test]

Each photo of {phase}A is translated by generator_x2y (AtoB) and each photo of {phase}B by
generator_y2x (BtoA), whole, at the network's own size (fineSizeH x fineSizeW of the
checkpoint), instances largest first as translate.py does. F below is the other generator.
Images are in [-1, 1] and every |difference| is averaged over the three channels, so 2 is
the largest possible error. "Pooled" means summed over the pixels of every image, then
divided by their number. The numbers, per direction:

domain_score             fraction of translated masks that the mask classifier puts in the
                         target domain. The classifier is a logistic regression (L2, classes
                         weighted equally) trained on the real train masks, A against B.
                         Features of an image: the union of its instance masks, binarised at
                         0, area-averaged down to 32x22 (HxW): the fraction of each cell covered.
domain_score_source      the same for the untranslated source masks: a baseline, low
realism_accuracy         balanced accuracy, over 5 seeded stratified folds, of the same kind of
                         classifier telling real target-domain train masks from translated
                         masks. 0.5: cannot be told apart; 1: always told apart
realism_accuracy_source  the same for the source masks against the real target ones: a baseline
mask_iou                 mean over instances of the IoU of source and translated mask, both
                         binarised at 0 (two empty masks count as 1)
background_error         pooled |x - G(x)| at network size, outside the union of the source and
                         translated masks (binarised at 0)
inside_error             the same inside that union, for contrast
background_error_full    pooled |x - up(G(x))| at the photo's own size, outside the union of
                         the photo's masks and the upsampled translated masks; up() is a
                         bicubic resize of float values, clipped to [-1, 1]
resampling_floor_full    pooled |x - up(down(x))| over the same pixels, down() being the
                         network-size input: what down- and up-sampling alone cost
background_excess_full   background_error_full - resampling_floor_full
cycle_error_image        mean |x - F(G(x))| over every pixel, at network size
cycle_error_masks        mean |m - F(G(m))| over every pixel of every instance mask (in [-1, 1])

The mask classifier's accuracy on the real {phase} masks (held out unless --phase is train)
is reported once.

With --predicted-masks [FOLDER] the same photos are translated and scored with the masks that
the mask predictor in FOLDER (default pretrained/mask_predictor) finds for the source
category of each direction (--categories, else the categories.json beside the model), split
into instances as generate_ccp_dataset.py does (--split-instances, --min-instance-area), in
place of the annotated ones: what translating a photo alone gives. Photos where it finds no
instance are counted and left out of the figures; more rows give the IoU of the predicted
source regions against the annotated ones (pooled over all the phase's photos) and the domain
score over all the phase's photos, a photo left out counting as a failure. The classifiers are
the same, fitted on the annotated train masks.

Output: a table (or with --json one JSON line) on stdout, and OUT/index.html with a tile per
photo (input | masks | translation | translated masks), sorted by the classifier's
probability of the target domain, best first.
"""

from runtime.signals import exit_at_once, handle_stop_signals

if __name__ == '__main__':  # until the results are written, a stop has nothing to save
    handle_stop_signals(exit_at_once)

import argparse
import html
import json
import math
import os
import re
import sys
from types import SimpleNamespace

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit
from tqdm import tqdm

import mask_predictor as mp
from args import add_instance_rule_flags, check_instance_rule, device_id, path
from data import (
    DataError,
    check_not_in_dataset,
    largest_first,
    list_images,
    load_image,
    load_mask,
    load_resized,
    mask_paths,
    read_photo,
    resize,
    resize_with_masks,
)
from runtime import RunError
from runtime.device import CONTEXTS, TYPE_CONFIGS, cuda_installed, set_context
from runtime.files import make_writable_folder, write_text
from runtime.monitors import image_panel, mask_panel, save_tile
from runtime.signals import StopRequest, exit_status
from translator import CATEGORIES, load_translators, read_categories

FEATURE_SIZE = (32, 22)  # (H, W) of the masks the classifiers see: CCP photos are about 3:2
L2 = 1e-2  # the best of 1e-5 ... 1 in 5-fold cross-validation on the CCP train masks
FOLDS = 5
SEED = 0
DIRECTIONS = {'AtoB': ('A', 'B'), 'BtoA': ('B', 'A')}  # direction: (source, target) domain

# (key, label) of each per-direction figure, in the order of the table.
METRICS = [
    ('domain_score', 'mask domain score (translated in target)'),
    ('domain_score_source', '  untranslated source masks (baseline)'),
    ('realism_accuracy', 'realism: real vs translated masks'),
    ('realism_accuracy_source', '  real vs source masks (baseline)'),
    ('mask_iou', 'mask IoU, source vs translated'),
    ('background_error', '|x - G(x)| outside masks, network size'),
    ('inside_error', '  inside the masks'),
    ('background_error_full', '|x - G(x)| outside masks, photo size'),
    ('resampling_floor_full', '  down- and up-sampling alone'),
    ('background_excess_full', '  excess over resampling'),
    ('cycle_error_image', 'cycle |x - F(G(x))|, image'),
    ('cycle_error_masks', '  masks'),
]


# Data ----------------------------------------------------------------------------------------


def load_phase(dataroot, phase, domain, size):
    """Photos of {phase}{domain} at network size (H, W), instances largest first. Each sample
    keeps its file paths; the photo-size copies are read only when they are scored."""
    folder = os.path.join(dataroot, phase + domain)
    samples = []
    for image_path in list_images(folder):
        masks = mask_paths(image_path)
        if not masks:
            raise DataError(
                f'{image_path}: no instance mask in {folder}_seg; evaluate.py needs '
                'a phase with masks (val has none)'
            )
        image, small_masks, _ = load_resized(image_path, masks, size)
        order = largest_first(small_masks)
        samples.append(
            SimpleNamespace(
                name=image_path.stem,
                image_path=image_path,
                mask_paths=masks,
                photo_masks=None,
                image=image,
                masks=small_masks[order],
            )
        )
    if len(samples) < 2:
        raise DataError(f'{folder}: one image; cross-validation needs at least 2')
    return samples


def predicted_phase(samples, predictor, category, size, split_instances, min_instance_area):
    """The samples with the instances of `category` that the predictor finds in their photos
    in place of the annotated masks: (those where it finds one, the number where it finds
    none, the IoU of the predicted region against the annotated one pooled over all)."""
    found, predicted_regions, annotated_regions = [], [], []
    for sample in tqdm(samples, desc=f'predicting {category}', dynamic_ncols=True, leave=False):
        photo = read_photo(sample.image_path)
        masks = mp.source_instances(predictor, photo, category, split_instances, min_instance_area)
        annotated = np.any([load_mask(path) for path in sample.mask_paths], axis=0)
        predicted_regions.append(np.any(masks, axis=0) if masks else np.zeros_like(annotated))
        annotated_regions.append(annotated)
        if masks:
            image, small_masks = resize_with_masks(photo, masks, size)
            found.append(
                SimpleNamespace(
                    name=sample.name,
                    image_path=sample.image_path,
                    mask_paths=None,
                    photo_masks=masks,
                    image=image,
                    masks=small_masks[largest_first(small_masks)],
                )
            )
    if len(found) < 2:
        folder = os.path.dirname(samples[0].image_path)
        raise DataError(
            f'{folder}: the mask predictor finds {category} in {len(found)} of '
            f'{len(samples)} photos; cross-validation needs at least 2'
        )
    return found, len(samples) - len(found), float(mp.iou(predicted_regions, annotated_regions))


def full_size_masks(sample):
    """(N, H, W) bool masks of a sample at its photo's size: predicted ones as kept, annotated
    ones read again."""
    if sample.photo_masks is not None:
        return np.stack(sample.photo_masks)
    return np.stack([load_mask(path) for path in sample.mask_paths])


def union(masks):
    """(N, H, W) masks in [-1, 1] -> bool (H, W), inside any instance."""
    return (masks > 0).any(axis=0)


def mask_features(mask_sets):
    """One row per image: the union of its masks, area-averaged down to FEATURE_SIZE."""
    height, width = FEATURE_SIZE
    return np.array(
        [resize(union(masks).astype(np.float32), (height, width), 'box').ravel() for masks in mask_sets],
        np.float64,
    )


def resize_channels(array, size):
    """(C, h, w) float -> (C, H, W) float, bicubic per channel without rounding to 8 bits."""
    return np.stack([resize(channel.astype(np.float32), size) for channel in array])


# Classifiers ---------------------------------------------------------------------------------


class LogisticRegression:
    """L2-regularised logistic regression on features in rows, labels 0 and 1, each class
    weighing half of the loss however many samples it has. The objective is strictly convex:
    Newton's method (steps by conjugate gradients) finds its one optimum from zero, and no
    seed is involved."""

    def __init__(self, l2=L2):
        self.l2 = l2

    def fit(self, features, labels):
        labels = np.asarray(labels, np.float64)
        if not 0 < labels.sum() < len(labels):
            raise ValueError('logistic regression needs samples of both classes')
        x = np.hstack([features, np.ones((len(features), 1))])
        weight = np.where(labels == 1, 0.5 / labels.sum(), 0.5 / (1 - labels).sum())
        penalty = np.full(x.shape[1], self.l2)
        penalty[-1] = 0  # the bias is not shrunk

        def loss_and_gradient(w):
            z = x @ w
            loss = weight @ (np.logaddexp(0, z) - labels * z) + 0.5 * penalty @ (w * w)
            return loss, x.T @ (weight * (expit(z) - labels)) + penalty * w

        def hessian_times(w, v):  # conjugate gradients need only these products
            p = expit(x @ w)
            return x.T @ (weight * p * (1 - p) * (x @ v)) + penalty * v

        self.weights = minimize(
            loss_and_gradient,
            np.zeros(x.shape[1]),
            jac=True,
            hessp=hessian_times,
            method='Newton-CG',
            options={'xtol': 1e-10},
        ).x
        return self

    def probability(self, features):
        """P(label 1) of each row."""
        return expit(features @ self.weights[:-1] + self.weights[-1])


def cross_validated_accuracy(first, second, folds=FOLDS, seed=SEED):
    """Balanced accuracy of telling feature rows `first` from `second`, each row predicted by
    a classifier fitted on the other folds; folds are stratified and drawn with `seed`."""
    features = np.concatenate([first, second])
    labels = np.r_[np.zeros(len(first)), np.ones(len(second))]
    folds = min(folds, len(first), len(second))
    rng = np.random.RandomState(seed)
    fold = np.empty(len(labels), int)
    for label in (0, 1):
        members = rng.permutation(np.flatnonzero(labels == label))
        fold[members] = np.arange(len(members)) % folds
    predicted = np.empty(len(labels))
    for k in range(folds):
        held_out = fold == k
        model = LogisticRegression().fit(features[~held_out], labels[~held_out])
        predicted[held_out] = model.probability(features[held_out]) >= 0.5
    return float(np.mean([np.mean(predicted[labels == label] == label) for label in (0, 1)]))


# Metrics -------------------------------------------------------------------------------------


def mask_iou(source, translated):
    """Per instance, IoU of (N, H, W) masks binarised at 0; 1 where both are empty."""
    source, translated = source > 0, translated > 0
    intersection = (source & translated).sum(axis=(1, 2))
    either = (source | translated).sum(axis=(1, 2))
    return np.where(either > 0, intersection / np.maximum(either, 1), 1.0)


class Pooled:
    """Running mean of |a - b| (averaged over channels) over the pixels selected."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def add(self, a, b, where):
        error = np.abs(a - b).mean(axis=0)[where]
        self.total += float(error.sum())
        self.count += error.size
        return float(error.mean()) if error.size else math.nan

    @property
    def mean(self):
        return self.total / self.count if self.count else math.nan


def evaluate_direction(sources, forward, backward, classifier, target, real_target):
    """Score one direction. sources: samples from load_phase; forward, backward: callables
    (image, masks) -> (image, masks) at network size, G and F; classifier: P(domain B) of
    mask features; target: 'A' or 'B'; real_target: features of real target train masks.
    Returns the summary (METRICS and counts) and, per sample, its tile panels and scores."""

    def target_probability(mask_sets):
        p = classifier.probability(mask_features(mask_sets))
        return p if target == 'B' else 1 - p

    errors = {
        name: Pooled()
        for name in ['background', 'inside', 'background_full', 'floor_full', 'cycle_image', 'cycle_masks']
    }
    ious, results = [], []
    for sample in tqdm(sources, desc='to ' + target, dynamic_ncols=True, leave=False):
        image, masks = forward(sample.image, sample.masks)
        cycle_image, cycle_masks = backward(image, masks)
        changed = union(sample.masks) | union(masks)
        background = errors['background'].add(sample.image, image, ~changed)
        errors['inside'].add(sample.image, image, changed)
        errors['cycle_image'].add(sample.image, cycle_image, Ellipsis)
        # [None]: every pixel of every instance counts once, not averaged over the instances
        errors['cycle_masks'].add(sample.masks[None], cycle_masks[None], Ellipsis)

        photo = load_image(sample.image_path)
        full_size = photo.shape[1:]
        outside = ~(full_size_masks(sample).any(axis=0) | union(resize_channels(masks, full_size)))
        errors['background_full'].add(photo, np.clip(resize_channels(image, full_size), -1, 1), outside)
        errors['floor_full'].add(photo, np.clip(resize_channels(sample.image, full_size), -1, 1), outside)

        iou = mask_iou(sample.masks, masks)
        ious.extend(iou)
        results.append(
            SimpleNamespace(
                name=sample.name,
                panels=[
                    image_panel(sample.image[None]),
                    mask_panel(sample.masks[None]),
                    image_panel(image[None]),
                    mask_panel(masks[None]),
                ],
                masks=masks,
                iou=float(iou.mean()),
                background=background,
            )
        )

    probability = target_probability([r.masks for r in results])
    for result, p in zip(results, probability):
        result.target_probability = float(p)
    summary = {
        'images': len(sources),
        'instances': len(ious),
        'domain_score': float(np.mean(probability >= 0.5)),
        'domain_score_source': float(np.mean(target_probability([s.masks for s in sources]) >= 0.5)),
        'realism_accuracy': cross_validated_accuracy(real_target, mask_features([r.masks for r in results])),
        'realism_accuracy_source': cross_validated_accuracy(
            real_target, mask_features([s.masks for s in sources])
        ),
        'mask_iou': float(np.mean(ious)),
        'background_error': errors['background'].mean,
        'inside_error': errors['inside'].mean,
        'background_error_full': errors['background_full'].mean,
        'resampling_floor_full': errors['floor_full'].mean,
        'background_excess_full': errors['background_full'].mean - errors['floor_full'].mean,
        'cycle_error_image': errors['cycle_image'].mean,
        'cycle_error_masks': errors['cycle_masks'].mean,
    }
    return summary, sorted(results, key=lambda r: -r.target_probability)


# Output --------------------------------------------------------------------------------------


def write_page(out, results_by_direction, report, stop):
    """Tiles of each direction, best first, and OUT/index.html listing them. A stop request
    ends it between two files; returns the number of tiles written then, None if complete."""
    sections, written = [], 0
    for direction, results in results_by_direction.items():
        rows = []
        for result in results:
            if stop.received:
                return written
            written += 1
            tile = f'{direction}_{result.name}.png'
            save_tile(os.path.join(out, tile), [result.panels])
            rows.append(
                f'<p>{html.escape(result.name)} p(target) '
                f'{result.target_probability:.3f}, IoU {result.iou:.3f}, background '
                f'{result.background:.4f}<br><img src="{html.escape(tile)}"></p>'
            )
        sections.append('<h2>{}</h2>\n{}'.format(direction, '\n'.join(rows)))
    write_text(
        os.path.join(out, 'index.html'),
        '<!doctype html>\n<title>InstaGAN evaluation</title>\n<pre>{}</pre>\n'
        "<p>input | masks | translation | translated masks, by the mask classifier's "
        'probability of the target domain, best first</p>\n{}\n'.format(
            html.escape(format_table(report)), '\n'.join(sections)
        ),
    )


def format_table(report):
    classifier = report['classifier']
    lines = [
        '{} on {}/{}, network size {}x{} (HxW)'.format(
            report['checkpoint'], report['dataroot'], report['phase'], *report['size']
        ),
        'mask classifier: {} A + {} B train masks, accuracy {:.3f} on the {} {} masks'.format(
            classifier['train_images']['A'],
            classifier['train_images']['B'],
            classifier['accuracy'],
            sum(classifier['phase_images'].values()),
            report['phase'],
        ),
        masks_line(report['masks']),
        '',
        '{:42}{:>9}{:>9}'.format('', *DIRECTIONS),
        '{:42}{:>9}{:>9}'.format('images', *(report[d]['images'] for d in DIRECTIONS)),
        '{:42}{:>9}{:>9}'.format('instances', *(report[d]['instances'] for d in DIRECTIONS)),
    ]
    if report['masks']['source'] == 'predicted':
        lines += [
            '{:42}{:>9}{:>9}'.format(
                '  photos without one (not scored)',
                *(report[d]['photos_without_instance'] for d in DIRECTIONS),
            ),
            '{:42}{:>9.3f}{:>9.3f}'.format(
                'source region IoU, predicted vs annotated',
                *(report[d]['predicted_region_iou'] for d in DIRECTIONS),
            ),
        ]
    for key, label in METRICS:
        lines.append('{:42}{:>9.3f}{:>9.3f}'.format(label, *(report[d][key] for d in DIRECTIONS)))
        if key == 'domain_score' and report['masks']['source'] == 'predicted':
            lines.append(
                '{:42}{:>9.3f}{:>9.3f}'.format(
                    '  of all photos (none predicted: 0)',
                    *(report[d]['domain_score_all_photos'] for d in DIRECTIONS),
                )
            )
    return '\n'.join(lines)


def masks_line(masks):
    if masks['source'] == 'annotated':
        return 'source masks: annotated'
    split = (
        f'--split-instances --min-instance-area {masks["min_instance_area"]}'
        if masks['split_instances']
        else 'each region one instance'
    )
    return 'source masks: predicted by {} ({}; {})'.format(
        masks['predictor'], ', '.join(f'{c} in {d}' for d, c in masks['categories'].items()), split
    )


# Command line --------------------------------------------------------------------------------


def existing_folder(path):
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f'{path}: folder not found')
    return path


def phase_name(name):
    if not re.fullmatch(r'[A-Za-z0-9_-]+', name):
        raise argparse.ArgumentTypeError(f'{name!r} is not a phase name like test or train')
    return name


def get_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        '--model-save-path',
        '-o',
        type=path,
        required=True,
        help="a model: a training run's --model-save-path (its newest "
        'checkpoint), a checkpoint folder, a pretrained/ folder or a '
        'parameters.h5',
    )
    parser.add_argument(
        '--dataroot',
        type=existing_folder,
        required=True,
        help='a dataset folder with trainA/B and {phase}A/B, masks included',
    )
    parser.add_argument(
        '--phase',
        type=phase_name,
        default='test',
        help='the photos scored; the classifiers always learn from train',
    )
    parser.add_argument(
        '--json', action='store_true', help='print one JSON line of every figure instead of the table'
    )
    parser.add_argument(
        '--out', type=path, help='folder of the tiles and index.html (default: results/evaluate/PHASE)'
    )
    parser.add_argument('--context', '-c', choices=CONTEXTS, default='cudnn' if cuda_installed() else 'cpu')
    parser.add_argument('--device-id', '-d', type=device_id, default='0')
    parser.add_argument('--type-config', '-t', choices=TYPE_CONFIGS, default='float')
    predicted = parser.add_argument_group('predicted masks')
    predicted.add_argument(
        '--predicted-masks',
        nargs='?',
        const=mp.DEFAULT_FOLDER,
        metavar='FOLDER',
        type=path,
        help='translate with the masks this mask predictor finds, not the '
        'annotated ones (FOLDER: pretrained/mask_predictor when not '
        'given)',
    )
    predicted.add_argument(
        '--categories',
        nargs=2,
        metavar=('CAT_A', 'CAT_B'),
        help='the categories of domains A and B, which the predictor finds '
        f'(from the {CATEGORIES} beside the model when not given)',
    )
    add_instance_rule_flags(predicted)
    args = parser.parse_args(argv)
    if not args.predicted_masks:
        for flag in ['categories', 'split_instances', 'min_instance_area']:
            if getattr(args, flag) not in (None, False):
                parser.error(f'--{flag.replace("_", "-")} goes with --predicted-masks')
    check_instance_rule(parser, args)
    return args


def masks_record(args, params_file):
    """How the source masks are made: annotated, or by the predictor (which, of what)."""
    if not args.predicted_masks:
        return {'source': 'annotated'}
    categories = dict(zip('AB', args.categories)) if args.categories else read_categories(params_file)
    if not categories:
        raise DataError(
            f'--predicted-masks: give --categories CAT_A CAT_B, the categories '
            f'the predictor finds; no {CATEGORIES} beside {params_file} names them'
        )
    folder = args.predicted_masks
    shown = os.path.relpath(folder) if folder == mp.DEFAULT_FOLDER else folder
    return {
        'source': 'predicted',
        'predictor': shown,
        'categories': categories,
        'split_instances': args.split_instances,
        'min_instance_area': args.min_instance_area,
    }


def main(argv=None):
    args = get_args(argv)
    out = args.out or os.path.join(
        'results', 'evaluate', args.phase + ('_predicted' if args.predicted_masks else '')
    )
    try:
        _, accelerate = set_context(args.context, args.device_id, args.type_config)
        params_file, config, generators = load_translators(
            args.model_save_path, DIRECTIONS, accelerate=accelerate
        )
        size = config.size
        masks = masks_record(args, params_file)
        phase = {d: load_phase(args.dataroot, args.phase, d, size) for d in 'AB'}
        train_features = {
            d: mask_features(s.masks for s in load_phase(args.dataroot, 'train', d, size)) for d in 'AB'
        }
        check_not_in_dataset(out, '--out')
        make_writable_folder(out, '--out')  # refuse an unwritable --out before any work
        sources, predicted = phase, {}
        if masks['source'] == 'predicted':
            predictor = mp.open_predictor(
                args.predicted_masks, list(masks['categories'].values()), accelerate
            )
            predicted = {
                d: predicted_phase(
                    phase[d],
                    predictor,
                    masks['categories'][d],
                    size,
                    args.split_instances,
                    args.min_instance_area,
                )
                for d in 'AB'
            }
            sources = {d: found for d, (found, _, _) in predicted.items()}
    except RunError as error:
        sys.exit(f'evaluate.py: {error}')

    classifier = LogisticRegression().fit(
        np.concatenate([train_features['A'], train_features['B']]),
        np.r_[np.zeros(len(train_features['A'])), np.ones(len(train_features['B']))],
    )
    correct = [
        (classifier.probability(mask_features(s.masks for s in phase[d])) >= 0.5) == (d == 'B') for d in 'AB'
    ]
    report = {
        'checkpoint': os.path.dirname(params_file),
        'dataroot': args.dataroot,
        'phase': args.phase,
        'size': list(size),
        'masks': masks,
        'classifier': {
            'train_images': {d: len(train_features[d]) for d in 'AB'},
            'phase_images': {d: len(phase[d]) for d in 'AB'},
            'accuracy': float(np.mean(np.concatenate(correct))),
            'feature_size': list(FEATURE_SIZE),
            'l2': L2,
            'realism_folds': FOLDS,
            'seed': SEED,
        },
    }
    results = {}
    for direction, (source, target) in DIRECTIONS.items():
        reverse = 'BtoA' if direction == 'AtoB' else 'AtoB'
        report[direction], results[direction] = evaluate_direction(
            sources[source],
            generators[direction],
            generators[reverse],
            classifier,
            target,
            train_features[target],
        )
        if predicted:
            _, without, region_iou = predicted[source]
            figures = report[direction]
            figures.update(
                photos_without_instance=without,
                predicted_region_iou=region_iou,
                domain_score_all_photos=figures['domain_score']
                * figures['images']
                / (figures['images'] + without),
            )
    # Every tile and index.html is written whole or not at all; a stop waits for the file.
    with StopRequest('stopping after this file') as stop:
        stop.deferring = True
        try:
            written = write_page(out, results, report, stop)
        except RunError as error:
            sys.exit(f'evaluate.py: {error}')
    if stop.received:
        print(
            f'evaluate.py: stopped by {stop.name} after {written} tile'
            f'{"s" * (written != 1)}; index.html is not written',
            file=sys.stderr,
        )
        sys.exit(exit_status(stop.received))
    print(json.dumps(report) if args.json else format_table(report))


if __name__ == '__main__':
    main()
