"""Train the mask predictor (mask_predictor.py) on Clothing Co-Parsing, and evaluate it.

    python train_masks.py --data_root datasets/clothing-co-parsing -o results/masks/models \\
        -m results/masks/monitor --max-epoch 40
    python train_masks.py --data_root datasets/clothing-co-parsing -o results/masks/models \\
        -m results/masks/monitor --max-epoch 40 --resume        # go on after a kill
    python train_masks.py --data_root datasets/clothing-co-parsing -o results/masks/models \\
        --evaluate --export results/masks/predictor   # the newest checkpoint only

It trains on CCP's pixel-level photos except the held-out ones: for each of --categories, the
photos that `datasets/generate_ccp_dataset.py --test-fraction F --split-seed S` puts in its
test folder (the same F and S here), so that a translation model and this predictor are both
measured on photos neither has seen. Every photo is read once, resized, into memory. An epoch
is every training photo showing one of the categories and as many others (--negatives times
as many), drawn afresh each epoch; each sample is flipped, cropped and rescaled at random.

Written: MONITOR/loss.series.txt (nnabla.monitor's `iteration value` lines) and
MONITOR/heldout_iou_CATEGORY.series.txt; MODELS/checkpoint_ITERATION (runtime/checkpoints.py's
layout: parameters.h5, solver.h5, state.json) after every epoch, the newest two kept; at the
end MODELS/predictor (parameters.h5 + predictor.json, what mask_predictor.load_predictor
reads) and the evaluation of the held-out photos, printed and drawn into --cases-image.
"""
import os
import sys

from runtime.signals import exit_at_once, handle_stop_signals

if __name__ == '__main__':  # before the slow imports, so that a Ctrl-C during them ends alike
    handle_stop_signals(exit_at_once)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import nnabla as nn  # noqa: E402
import nnabla.solvers as S  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

import mask_predictor as mp  # noqa: E402
from args import checked, device_id, path, positive_int, seed  # noqa: E402
from runtime.checkpoints import (DamagedCheckpoint, checkpoint_paths,  # noqa: E402
                                 load_parameters_and_solvers, read_checkpoint, save_checkpoint)
from datasets import ccp  # noqa: E402
from runtime import device  # noqa: E402
from runtime.monitors import SeriesFile as MonitorSeriesFile  # noqa: E402
from runtime.monitors import save_tile  # noqa: E402

# What a resumed run must share with the run it continues: the data and the network.
SAME_ON_RESUME = ['data_root', 'categories', 'test_fraction', 'split_seed', 'size', 'width',
                  'levels', 'seed']
PRELOAD_SCALE = 1.125  # photos are kept this much larger than --size, for the random crops
CROP_SCALES = (0.8, 1.0)  # side of the random crop, as a share of the kept photo


class ConfigError(Exception):
    """A flag or the data does not allow the run; the message is one line."""


# ---------------------------------------------------------------------------------------------
# Data

def class_map(labels, label_ids):
    """CCP label map -> class ids: 0 background, c + 1 where labels == label_ids[c]."""
    classes = np.zeros(labels.shape, np.uint8)
    for index, label in enumerate(label_ids, start=1):
        classes[labels == label] = index
    return classes


def read_ccp(data_root, categories, test_fraction, split_seed):
    """The CCP copy's pixel-level annotations and the split: (label_maps {name: label map},
    label ids of the categories, held-out names {category: frozenset}), checked."""
    data_root = Path(data_root)
    ccp.check_layout(data_root)
    names = ccp.label_names(data_root)
    label_ids = [ccp.label_of(names, category) for category in categories]
    label_maps = ccp.read_label_maps(data_root)
    if not label_maps:
        raise ConfigError(f'{data_root}: no pixel-level annotations')
    held_out = {category: ccp.held_out_names(label_maps, label, test_fraction, split_seed)
                for category, label in zip(categories, label_ids)}
    for category, label in zip(categories, label_ids):
        if not ccp.photos_with(label_maps, label):
            raise ConfigError(f'--categories {category}: no pixel-level annotation contains it')
    return label_maps, label_ids, held_out


def load_training_data(data_root, names, label_maps, label_ids, size):
    """Photos (N, h, w, 3) uint8 and class maps (N, h, w) uint8 of `names`, at PRELOAD_SCALE
    times `size`."""
    kept = tuple(round(s * PRELOAD_SCALE) for s in size)
    photos = np.empty((len(names), *kept, 3), np.uint8)
    classes = np.empty((len(names), *kept), np.uint8)
    for index, name in enumerate(tqdm(names, desc='load photos', unit='photo')):
        photo = ccp.load_photo(Path(data_root) / 'photos' / f'{name}.jpg')
        labels = label_maps[name]
        if photo.size != labels.shape[::-1]:
            raise ConfigError(f'{name}: annotation is {labels.shape[1]}x{labels.shape[0]} but '
                              f'its photo is {photo.width}x{photo.height}')
        photos[index] = np.asarray(photo.resize(kept[::-1], Image.BILINEAR))
        classes[index] = mp.resize_labels(class_map(labels, label_ids), kept)
    return photos, classes


def augment(photo, classes, size, rng):
    """A random crop of CROP_SCALES of the kept photo, at a random place, resized to `size`,
    flipped left-right half of the time: ((3, H, W) float in [-1, 1], (H, W) class ids)."""
    height, width = classes.shape
    scale = rng.uniform(*CROP_SCALES)
    crop_h, crop_w = round(height * scale), round(width * scale)
    top, left = rng.randint(0, height - crop_h + 1), rng.randint(0, width - crop_w + 1)
    photo = photo[top:top + crop_h, left:left + crop_w]
    classes = classes[top:top + crop_h, left:left + crop_w]
    if rng.rand() < 0.5:
        photo, classes = photo[:, ::-1], classes[:, ::-1]
    image = mp.to_network_input(np.ascontiguousarray(photo), size)
    # a little brightness and contrast change, as between photos
    image = np.clip(image * rng.uniform(0.85, 1.15) + rng.uniform(-0.1, 0.1), -1, 1)
    return image, mp.resize_labels(classes, size)


def epoch_order(classes, negatives, seed, epoch):
    """The sample indices of an epoch: every photo showing a category, plus `negatives` times
    as many of the others (all of them at most), shuffled; the same for the same seed and
    epoch, so that a resumed run repeats it."""
    rng = np.random.RandomState([seed, epoch])
    shows = classes.reshape(len(classes), -1).max(axis=1) > 0
    positive, negative = np.flatnonzero(shows), np.flatnonzero(~shows)
    count = min(len(negative), round(negatives * len(positive)))
    chosen = np.concatenate([positive, rng.choice(negative, count, replace=False)])
    return rng.permutation(chosen)


def batches(photos, classes, order, batch_size, size, rng):
    """(images, labels) numpy batches of the epoch; the last partial batch is dropped."""
    for start in range(0, len(order) - batch_size + 1, batch_size):
        samples = [augment(photos[i], classes[i], size, rng)
                   for i in order[start:start + batch_size]]
        yield (np.stack([image for image, _ in samples]),
               np.stack([labels for _, labels in samples])[:, None].astype(np.int32))


# ---------------------------------------------------------------------------------------------
# Checkpoint and resume: the whole of it, kept apart for the shared run machinery to replace

def save_epoch(model_path, iteration, epoch, args, solver, series):
    """A checkpoint after `epoch`, so that a killed run can resume with the next."""
    state = dict(epoch=epoch, args=run_record(args),
                 series={name: s.state_dict() for name, s in series.items()})
    save_checkpoint(model_path, iteration, state, {'solver': solver}, keep=2)


def resume_from(model_path, args, solver, series):
    """Load the newest checkpoint of model_path into the parameters, solver and series;
    return (iteration, next epoch). Refuses one made with other data or network flags."""
    paths = checkpoint_paths(model_path)
    if not paths:
        raise ConfigError(f'--resume: no checkpoint in {model_path}')
    state = read_checkpoint(paths[-1], ['epoch', 'args', 'series'])
    previous = state['args']
    if not isinstance(previous, dict):
        raise DamagedCheckpoint(f'{paths[-1]}/state.json: args is not a record')
    record = run_record(args)
    changed = [key for key in SAME_ON_RESUME if previous.get(key) != record[key]]
    if changed:
        raise ConfigError('--resume: the checkpoint was made with other ' + ', '.join(
            f'{flag_name(key)} ({previous.get(key)!r}, now {record[key]!r})'
            for key in changed))
    epoch, iteration = state['epoch'], state['iteration']
    if not (isinstance(epoch, int) and isinstance(iteration, int) and epoch >= 0
            and iteration >= 0):
        raise DamagedCheckpoint(f'{paths[-1]}/state.json: epoch and iteration must be '
                                'integers >= 0')
    load_parameters_and_solvers(paths[-1], {'solver': solver})
    for name, one in series.items():
        saved = state['series'].get(name) if isinstance(state['series'], dict) else None
        if saved is not None:
            one.load_state_dict(saved)
    return iteration, epoch + 1


def flag_name(key):
    """The flag of an argparse destination: --data_root keeps its underscore, as in
    generate_ccp_dataset.py; the others have dashes."""
    return '--' + (key if key == 'data_root' else key.replace('_', '-'))


def run_record(args):
    """The flags as JSON values, for state.json."""
    record = dict(vars(args))
    record['data_root'] = str(Path(args.data_root).resolve())
    record['size'], record['categories'] = list(args.size), list(args.categories)
    return record


# ---------------------------------------------------------------------------------------------
# Evaluation

def evaluate(predictor, data_root, names, label_maps, label_ids, split_instances=False,
             min_instance_area=0.002, tolerance=2):
    """Measures of the predictor on the photos `names` at their own resolution. Returns
    {'iou': {category: pooled IoU}, 'count_accuracy': {category: share}, 'boundary_f':
    {category: mean F over photos where the category is annotated or predicted},
    'per_photo': {name: mean IoU over the categories annotated or predicted there}, 'photos':
    {name: (photo, annotated class map, predicted class map)}}."""
    pairs = {category: [] for category in predictor.categories}
    counts = {category: ([], []) for category in predictor.categories}
    boundary_f = {category: [] for category in predictor.categories}
    per_photo, shown = {}, {}
    for name in tqdm(sorted(names), desc='evaluate', unit='photo'):
        photo = np.asarray(ccp.load_photo(Path(data_root) / 'photos' / f'{name}.jpg'))
        annotated = class_map(label_maps[name], label_ids)
        predicted = mp.predict_labels(predictor, photo)
        scores = []
        for index, category in enumerate(predictor.categories, start=1):
            truth, guess = annotated == index, predicted == index
            pairs[category].append(mp.intersection_and_union(guess, truth))
            for found, mask in zip(counts[category], (guess, truth)):
                found.append(len(ccp.instance_masks(mask, split_instances, min_instance_area)))
            if truth.any() or guess.any():
                boundary_f[category].append(mp.boundary_f_score(guess, truth, tolerance))
                scores.append(mp.iou(guess, truth))
        per_photo[name] = float(np.mean(scores)) if scores else 1.0
        shown[name] = (photo, annotated, predicted)
    iou = {}
    for category, sums in pairs.items():
        overlap, union = np.sum(sums, axis=0)
        iou[category] = 1.0 if union == 0 else float(overlap / union)
    return dict(iou=iou,
                count_accuracy={c: mp.instance_count_accuracy(*counts[c])
                                for c in predictor.categories},
                boundary_f={c: float(np.mean(f)) if f else 1.0 for c, f in boundary_f.items()},
                per_photo=per_photo, photos=shown)


PALETTE = np.array([[0, 0, 0], [0.25, 0.45, 1.0], [1.0, 0.3, 0.25], [0.3, 0.9, 0.3],
                    [1.0, 0.85, 0.2], [0.8, 0.3, 1.0]])


def label_panel(photo, classes, size):
    """The photo dimmed, with each category's pixels in its PALETTE colour, at `size`, in
    [0, 1]."""
    photo = np.asarray(Image.fromarray(photo).resize(size[::-1], Image.BILINEAR)) / 255
    classes = mp.resize_labels(classes, size)
    colours = PALETTE[1:][(classes - 1) % (len(PALETTE) - 1)]
    return np.where(classes[..., None] > 0, 0.3 * photo + 0.7 * colours, 0.45 * photo)


def draw_cases(path, results, count=3, size=(216, 144)):
    """Rows photo | annotated | predicted of the `count` best and worst photos by mean IoU."""
    ranked = sorted(results['per_photo'], key=lambda name: (-results['per_photo'][name], name))
    best = ranked[:count]
    worst = [name for name in ranked[::-1][:count] if name not in best][::-1]
    rows = []
    for name in best + worst:
        photo, annotated, predicted = results['photos'][name]
        rows.append([np.asarray(Image.fromarray(photo).resize(size[::-1], Image.BILINEAR))
                     / 255, label_panel(photo, annotated, size),
                     label_panel(photo, predicted, size)])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_tile(path, rows)
    return best, worst


def report(results, categories):
    lines = [f'held-out photos: {len(results["per_photo"])}']
    for category in categories:
        lines.append(f'{category}: IoU {results["iou"][category]:.3f}, instance count accuracy '
                     f'{results["count_accuracy"][category]:.3f}, boundary F '
                     f'{results["boundary_f"][category]:.3f}')
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------
# Training

def learning_rate(base, epoch, max_epoch):
    """Cosine decay from `base` to a twentieth of it over the run."""
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * epoch / max_epoch)))


def build_training_graph(args):
    """(image, labels, one_hot, loss) variables of a training batch."""
    height, width = args.size
    n_classes = 1 + len(args.categories)
    image = nn.Variable((args.batch_size, 3, height, width))
    labels = nn.Variable((args.batch_size, 1, height, width))
    one_hot = nn.Variable((args.batch_size, n_classes, height, width))
    logits = mp.predictor_logits(image, n_classes, args.width, args.levels)
    loss = mp.segmentation_loss(logits, labels, one_hot)
    loss.persistent = True
    return image, labels, one_hot, loss


def export_predictor(folder, args):
    """parameters.h5 (the predictor's only) and predictor.json into `folder`."""
    os.makedirs(folder, exist_ok=True)
    with nn.parameter_scope(mp.SCOPE):
        parameters = nn.get_parameters(grad_only=False)
    nn.save_parameters(os.path.join(folder, 'parameters.h5'),
                       {f'{mp.SCOPE}/{name}': value for name, value in parameters.items()})
    mp.write_config(folder, args.categories, args.size, args.width, args.levels)


def held_out_evaluation(args, label_maps, label_ids, held_out_names):
    """Evaluate the current parameters on the held-out photos; print, draw the cases."""
    predictor = mp.build_predictor(args.categories, args.size, args.width, args.levels)
    results = evaluate(predictor, args.data_root, held_out_names, label_maps, label_ids,
                       args.split_instances, args.min_instance_area)
    print(report(results, args.categories))
    best, worst = draw_cases(args.cases_image, results)
    print(f'{args.cases_image}: best {", ".join(best)}; worst {", ".join(worst)} (top to '
          'bottom)')
    return results


def train(args):
    label_maps, label_ids, held_out = read_ccp(args.data_root, args.categories,
                                               args.test_fraction, args.split_seed)
    held_out_names = sorted(set().union(*held_out.values()))
    accelerate = device.set_context(args.context, args.device_id)[1]
    nn.clear_parameters()
    nn.seed(args.seed)

    if args.evaluate:
        paths = checkpoint_paths(args.model_save_path) if os.path.isdir(
            args.model_save_path) else []
        if not paths:
            raise ConfigError(f'--evaluate: no checkpoint in {args.model_save_path}')
        state = read_checkpoint(paths[-1], ['args'])
        for key in ['size', 'width', 'levels', 'categories']:  # the network it was made with
            setattr(args, key, state['args'][key])
        nn.load_parameters(os.path.join(paths[-1], 'parameters.h5'))
        print(f'{paths[-1]}: epoch {state.get("epoch")}')
        held_out_evaluation(args, label_maps, label_ids, held_out_names)
        if args.export:
            export_predictor(args.export, args)
            print(f'predictor: {args.export}')
        return

    os.makedirs(args.model_save_path, exist_ok=True)
    os.makedirs(args.monitor_path, exist_ok=True)
    if checkpoint_paths(args.model_save_path) and not args.resume:
        raise ConfigError(f'{args.model_save_path} holds checkpoints: pass --resume to go on, '
                          'or choose another --model-save-path')
    train_names = [name for name in label_maps if name not in set(held_out_names)]
    print(f'training photos: {len(train_names)}; held out: {len(held_out_names)} ('
          + ', '.join(f'{c} {len(n)}' for c, n in held_out.items()) + ')')
    photos, classes = load_training_data(args.data_root, train_names, label_maps, label_ids,
                                         args.size)

    image, labels, one_hot, loss = build_training_graph(args)
    accelerate(loss)
    solver = S.Adam(args.learning_rate)
    with nn.parameter_scope(mp.SCOPE):
        solver.set_parameters(nn.get_parameters())
    series = {name: MonitorSeriesFile(args.monitor_path, name, interval)
              for name, interval in [('loss', args.log_step), ('epoch_time', 1)]
              + [(f'heldout_iou_{c}', 1) for c in args.categories]}
    iteration, first_epoch = 0, 0
    if args.resume and checkpoint_paths(args.model_save_path):
        iteration, first_epoch = resume_from(args.model_save_path, args, solver, series)
        print(f'resumed at epoch {first_epoch}, iteration {iteration}')
    n_classes = 1 + len(args.categories)
    for epoch in range(first_epoch, args.max_epoch):
        started = time.time()
        solver.set_learning_rate(learning_rate(args.learning_rate, epoch, args.max_epoch))
        order = epoch_order(classes, args.negatives, args.seed, epoch)
        rng = np.random.RandomState([args.seed, epoch, 1])
        steps = len(order) // args.batch_size
        progress = tqdm(batches(photos, classes, order, args.batch_size, args.size, rng),
                        total=steps, desc=f'epoch {epoch + 1}/{args.max_epoch}', unit='batch',
                        mininterval=5)
        for images, batch_labels in progress:
            image.d, labels.d = images, batch_labels
            one_hot.d = mp.one_hot_planes(batch_labels, n_classes)
            loss.forward(clear_no_need_grad=True)
            solver.zero_grad()
            loss.backward(clear_buffer=True)
            solver.update()
            value = float(loss.d)
            if not math.isfinite(value):
                raise ConfigError(f'the loss is {value} at iteration {iteration}; lower '
                                  '--learning-rate')
            series['loss'].add(iteration, value)
            progress.set_postfix(loss=f'{value:.3f}', refresh=False)
            iteration += 1
        progress.close()
        series['epoch_time'].add(epoch, time.time() - started)
        if args.eval_interval and ((epoch + 1) % args.eval_interval == 0
                                   or epoch + 1 == args.max_epoch):
            predictor = mp.build_predictor(args.categories, args.size, args.width, args.levels)
            results = evaluate(predictor, args.data_root, held_out_names, label_maps, label_ids)
            for category in args.categories:
                series[f'heldout_iou_{category}'].add(epoch, results['iou'][category])
            print(f'epoch {epoch + 1}: held-out IoU ' + ', '.join(
                f'{c} {results["iou"][c]:.3f}' for c in args.categories), flush=True)
        save_epoch(args.model_save_path, iteration, epoch, args, solver, series)
    export_predictor(os.path.join(args.model_save_path, 'predictor'), args)
    print(f'predictor: {os.path.join(args.model_save_path, "predictor")}')
    held_out_evaluation(args, label_maps, label_ids, held_out_names)


fraction = checked(float, lambda v: 0 <= v < 1, 'a number in [0, 1)')
positive_float = checked(float, lambda v: math.isfinite(v) and v > 0, 'a finite number > 0')
non_negative_float = checked(float, lambda v: math.isfinite(v) and v >= 0, 'a finite number >= 0')


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--context', '-c', default='cpu', choices=['cpu', 'cudnn'],
                        help='nnabla extension context')
    parser.add_argument('--device-id', '-d', type=device_id, default='0')
    parser.add_argument('--batch-size', '-b', type=positive_int, default=8)
    parser.add_argument('--max-epoch', type=positive_int, default=40)
    parser.add_argument('--learning-rate', type=positive_float, default=1e-3,
                        help='Adam step size at the start; cosine decay to 1/20 of it')
    parser.add_argument('--monitor-path', '-m', type=path, default='results/masks/monitor')
    parser.add_argument('--model-save-path', '-o', type=path, default='results/masks/models')
    parser.add_argument('--data_root', type=path, default='datasets/clothing-co-parsing',
                        help='a Clothing Co-Parsing copy')
    parser.add_argument('--categories', nargs='+', default=list(mp.DEFAULT_CATEGORIES),
                        help='the CCP categories to predict (besides background)')
    parser.add_argument('--test-fraction', type=fraction, default=0.1,
                        help='hold out the photos generate_ccp_dataset.py --test-fraction '
                             'holds out for each category (0: none)')
    parser.add_argument('--split-seed', type=checked(int, lambda v: 0 <= v < 2 ** 32,
                                                     'an integer in [0, 2**32)'), default=0)
    parser.add_argument('--size', nargs=2, type=positive_int, default=list(mp.DEFAULT_SIZE),
                        metavar=('H', 'W'), help='network input size')
    parser.add_argument('--width', type=positive_int, default=mp.DEFAULT_WIDTH,
                        help='channels of the first U-Net level')
    parser.add_argument('--levels', type=checked(int, lambda v: 1 <= v <= 8, 'in [1, 8]'),
                        default=mp.DEFAULT_LEVELS, help='U-Net levels')
    parser.add_argument('--negatives', type=non_negative_float, default=1.0,
                        help='photos without any category per photo with one, in an epoch')
    parser.add_argument('--seed', type=seed, default=0)
    parser.add_argument('--log-step', type=positive_int, default=10,
                        help='iterations per line of loss.series.txt')
    parser.add_argument('--eval-interval', type=checked(int, lambda v: v >= 0, 'an integer >= 0'),
                        default=5, help='epochs between held-out IoU lines (0: none)')
    parser.add_argument('--resume', action='store_true',
                        help='go on from the newest checkpoint in --model-save-path')
    parser.add_argument('--evaluate', action='store_true',
                        help='only evaluate the newest checkpoint on the held-out photos')
    parser.add_argument('--export', type=path,
                        help='with --evaluate: also write the checkpoint as a predictor folder '
                             '(parameters.h5, predictor.json) here')
    parser.add_argument('--split-instances', action='store_true',
                        help='evaluation: count 8-connected components as instances')
    parser.add_argument('--min-instance-area', type=fraction, default=0.002,
                        help='evaluation, with --split-instances: smallest instance, as a '
                             'share of the photo')
    parser.add_argument('--cases-image', type=path, default='imgs/mask_predictor_cases.png',
                        help='picture of the best and worst held-out photos')
    args = parser.parse_args(argv)
    if args.export and not args.evaluate:
        parser.error('--export goes with --evaluate (a finished run exports MODELS/predictor)')
    if len(set(args.categories)) != len(args.categories):
        parser.error('--categories: each category once')
    try:
        mp.check_size(args.size, args.levels)
    except ValueError as error:
        parser.error(f'--size: {error}')
    return args


def main(argv=None):
    args = get_args(argv)
    try:
        train(args)
    except (ConfigError, ccp.DatasetError, DamagedCheckpoint, OSError) as error:
        sys.exit(f'train_masks.py: {error}')


if __name__ == '__main__':
    main()
