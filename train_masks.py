"""Train the mask predictor (mask_predictor.py) on Clothing Co-Parsing, and evaluate it.

    python train_masks.py --data_root datasets/clothing-co-parsing -o results/masks/models \\
        -m results/masks/monitor --max-epoch 40
    python train_masks.py --data_root datasets/clothing-co-parsing -o results/masks/models \\
        -m results/masks/monitor --max-epoch 40 --resume   # go on after a stop or a kill
    python train_masks.py --data_root datasets/clothing-co-parsing -o results/masks/models \\
        --evaluate --export results/masks/predictor       # the newest checkpoint only
    python train_masks.py --data_root datasets/clothing-co-parsing \\
        -o pretrained/mask_predictor --evaluate            # a predictor folder

It trains on CCP's pixel-level photos except the held-out ones: for each of --categories, the
photos that `datasets/generate_ccp_dataset.py --test-fraction F --split-seed S` puts in its
test folder (the same F and S here), so that a translation model and this predictor are both
measured on photos neither has seen. Every photo is read once, resized, into memory. An epoch
is every training photo showing one of the categories and as many others (--negatives times
as many), drawn afresh each epoch; each sample is flipped, cropped and rescaled at random.
--other-categories are learnt as classes of their own (a coat is then a coat, not background
that looks like a skirt) but are neither held out, scored nor ever predicted as masks.

The run's folders, checkpoints, series and device are the project's run machinery (runtime/),
as for train.py: -o and -m are locked while the run lasts (FOLDER/train.lock); a fresh run
refuses folders holding another run's files unless given --resume (continue it) or
--overwrite (delete them); --resume continues from the newest intact checkpoint exactly where
it was saved; the first SIGINT or SIGTERM saves a checkpoint after the current iteration and
ends the run (exit status 130 or 143), a second one ends it at once.

Written: MONITOR/loss.series.txt (nnabla.monitor's `iteration value` lines),
MONITOR/epoch_time.series.txt and MONITOR/heldout_iou_CATEGORY.series.txt (`epoch value`),
MONITOR/run.json and Arguments.txt; MODELS/checkpoint_ITERATION (runtime/checkpoints.py's
layout) after every epoch and on a stop, the newest two kept; at the end MODELS/predictor
(parameters.h5 + predictor.json, what mask_predictor.load_predictor reads) and the evaluation
of the held-out photos, printed and drawn into --cases-image.
"""

from runtime.signals import exit_at_once, handle_stop_signals

if __name__ == '__main__':  # before the slow imports, so that a Ctrl-C during them ends alike
    handle_stop_signals(exit_at_once)

import argparse
import io
import math
import os
import re
import sys
import time
from pathlib import Path

import nnabla as nn
import nnabla.solvers as S
import numpy as np
from PIL import Image

import mask_predictor as mp
from args import checked, device_id, path, positive_int, seed
from datasets import ccp
from runtime import RunError
from runtime.checkpoints import (
    DamagedCheckpoint,
    checkpoint_paths,
    load_parameters_and_solvers,
    read_checkpoint,
    resume_newest,
    save_checkpoint,
)
from runtime.device import set_context
from runtime.files import make_writable_folder, write_bytes
from runtime.monitors import Progress, SeriesFile, save_tile
from runtime.run import Run, run_files

# What a resumed run must share with the run it continues: the data and the network.
SAME_ON_RESUME = [
    'data_root',
    'categories',
    'other_categories',
    'test_fraction',
    'split_seed',
    'size',
    'width',
    'levels',
    'seed',
]
PRELOAD_SCALE = 1.125  # photos are kept this much larger than --size, for the random crops
CROP_SCALES = (0.8, 1.0)  # side of the random crop, as a share of the kept photo
KEEP_CHECKPOINTS = 2


# ---------------------------------------------------------------------------------------------
# Data


def class_map(labels, label_ids):
    """CCP label map -> class ids: 0 background, c + 1 where labels == label_ids[c]."""
    classes = np.zeros(labels.shape, np.uint8)
    for index, label in enumerate(label_ids, start=1):
        classes[labels == label] = index
    return classes


def read_ccp(data_root, categories, test_fraction, split_seed, other_categories=()):
    """The CCP copy's pixel-level annotations and the split: (label_maps {name: label map},
    label ids of the categories then of other_categories, held-out names {category:
    frozenset}, other_categories), checked; other_categories ['all'] stands for every other
    category some annotation contains. Only the categories decide which photos are held out."""
    data_root = Path(data_root)
    ccp.check_layout(data_root)
    names = ccp.label_names(data_root)
    label_maps = ccp.read_label_maps(data_root)
    if not label_maps:
        raise RunError(f'{data_root}: no pixel-level annotations')
    if list(other_categories) == ['all']:
        present = set().union(*(np.unique(labels).tolist() for labels in label_maps.values()))
        other_categories = [
            name
            for label, name in enumerate(names)
            if label in present and name not in ('', 'null', *categories)
        ]
    label_ids = [ccp.label_of(names, category) for category in [*categories, *other_categories]]
    held_out = {
        category: ccp.held_out_names(label_maps, label, test_fraction, split_seed)
        for category, label in zip(categories, label_ids)
    }
    for category, label in zip([*categories, *other_categories], label_ids):
        if not ccp.photos_with(label_maps, label):
            raise RunError(f'{category}: no pixel-level annotation contains it')
    return label_maps, label_ids, held_out, list(other_categories)


def load_training_data(data_root, names, label_maps, label_ids, size):
    """Photos (N, h, w, 3) uint8 and class maps (N, h, w) uint8 of `names`, at PRELOAD_SCALE
    times `size`."""
    kept = tuple(round(s * PRELOAD_SCALE) for s in size)
    photos = np.empty((len(names), *kept, 3), np.uint8)
    classes = np.empty((len(names), *kept), np.uint8)
    with Progress(len(names), 0, 'load photos') as progress:
        for index, name in enumerate(names):
            photo = ccp.load_photo(Path(data_root) / 'photos' / f'{name}.jpg')
            labels = label_maps[name]
            if photo.size != labels.shape[::-1]:
                raise RunError(
                    f'{name}: annotation is {labels.shape[1]}x{labels.shape[0]} but '
                    f'its photo is {photo.width}x{photo.height}'
                )
            photos[index] = np.asarray(photo.resize(kept[::-1], Image.BILINEAR))
            classes[index] = mp.resize_labels(class_map(labels, label_ids), kept)
            progress.update()
    return photos, classes


def augment(photo, classes, size, rng):
    """A random crop of CROP_SCALES of the kept photo, at a random place, resized to `size`,
    flipped left-right half of the time: ((3, H, W) float in [-1, 1], (H, W) class ids)."""
    height, width = classes.shape
    scale = rng.uniform(*CROP_SCALES)
    crop_h, crop_w = round(height * scale), round(width * scale)
    top, left = rng.randint(0, height - crop_h + 1), rng.randint(0, width - crop_w + 1)
    photo = photo[top : top + crop_h, left : left + crop_w]
    classes = classes[top : top + crop_h, left : left + crop_w]
    if rng.rand() < 0.5:
        photo, classes = photo[:, ::-1], classes[:, ::-1]
    image = mp.to_network_input(np.ascontiguousarray(photo), size)
    # a little brightness and contrast change, as between photos
    image = np.clip(image * rng.uniform(0.85, 1.15) + rng.uniform(-0.1, 0.1), -1, 1)
    return image, mp.resize_labels(classes, size)


def epoch_order(classes, n_categories, negatives, seed, epoch):
    """The sample indices of an epoch: every photo showing a category (class 1 to
    n_categories), plus `negatives` times as many of the others (all of them at most),
    shuffled; the same for the same seed and epoch, so that a resumed run repeats it."""
    rng = np.random.RandomState([seed, epoch])
    flat = classes.reshape(len(classes), -1)
    shows = ((flat > 0) & (flat <= n_categories)).any(axis=1)
    positive, negative = np.flatnonzero(shows), np.flatnonzero(~shows)
    count = min(len(negative), round(negatives * len(positive)))
    chosen = np.concatenate([positive, rng.choice(negative, count, replace=False)])
    return rng.permutation(chosen)


def batches(photos, classes, order, batch_size, size, seed, epoch, start=0):
    """(images, labels) numpy batches of the epoch from its sample `start` on; the last partial
    batch is dropped. The k-th sample of an epoch is augmented by a generator of its own, seeded
    with (seed, epoch, k), so that a run resumed within an epoch draws what an uninterrupted
    one would."""
    for first in range(start, len(order) - batch_size + 1, batch_size):
        samples = [
            augment(photos[i], classes[i], size, np.random.RandomState([seed, epoch, 1, k]))
            for k, i in enumerate(order[first : first + batch_size], start=first)
        ]
        yield (
            np.stack([image for image, _ in samples]),
            np.stack([labels for _, labels in samples])[:, None].astype(np.int32),
        )


# ---------------------------------------------------------------------------------------------
# The run: its files, checkpoints and resuming


def series_names(categories):
    return ['loss', 'epoch_time'] + [f'heldout_iou_{category}' for category in categories]


def mask_run_files(categories):
    """Every name a run writes into -o and -m: train.py's kinds of file, and MODELS/predictor."""
    return re.compile(rf'{run_files(series_names(categories)).pattern}|predictor')


def flag_name(key):
    """The flag of an argparse destination: --data_root keeps its underscore, as in
    generate_ccp_dataset.py; the others have dashes."""
    return '--' + (key if key == 'data_root' else key.replace('_', '-'))


def run_record(args):
    """The flags as JSON values, for state.json."""
    record = dict(vars(args))
    record['data_root'] = str(Path(args.data_root).resolve())
    record['size'], record['categories'] = list(args.size), list(args.categories)
    record['other_categories'] = list(args.other_categories)
    return record


def save(args, run, solver, series, iteration, epoch, samples, seconds):
    """The checkpoint of `iteration`: `samples` of epoch `epoch` trained on (all of them at the
    end of an epoch), in `seconds`; returns its path."""
    state = dict(
        next_epoch=epoch,
        samples=samples,
        epoch_seconds=seconds,
        run=run.id,
        args=run_record(args),
        series={name: s.state_dict() for name, s in series.items()},
    )
    return save_checkpoint(args.model_save_path, iteration, state, {'solver': solver}, KEEP_CHECKPOINTS)


def place_of(path, state):
    """(iteration, epoch, samples of it trained on, seconds spent on them) where the checkpoint
    `path` left off."""
    try:
        if 'next_epoch' in state:
            place = (state['iteration'], state['next_epoch'], state['samples'], state['epoch_seconds'])
        else:  # earlier versions saved after an epoch only, and named that epoch
            place = (state['iteration'], state['epoch'] + 1, 0, 0.0)
    except (KeyError, TypeError) as error:
        raise DamagedCheckpoint(
            f'{path}/state.json: no place in training ({type(error).__name__}: {error})'
        ) from None
    if not (
        all(type(v) is int and v >= 0 for v in place[:3])
        and isinstance(place[3], (int, float))
        and place[3] >= 0
    ):
        raise DamagedCheckpoint(
            f'{path}/state.json: iteration, epoch and samples must be '
            'integers >= 0, the seconds a number >= 0'
        )
    return place


def resume(args, run, solver, series):
    """Restore the newest intact checkpoint of -o into the parameters, the solver and the
    series; returns its place_of. Refuses one made with other data or network flags."""

    def restore(path):
        state = read_checkpoint(path, ['args', 'series'])
        previous = state['args']
        if not isinstance(previous, dict) or not isinstance(state['series'], dict):
            raise DamagedCheckpoint(f'{path}/state.json: args and series must be records')
        record = run_record(args)
        changed = [key for key in SAME_ON_RESUME if previous.get(key) != record[key]]
        if changed:
            raise RunError(
                f'--resume: {path} was made with other '
                + ', '.join(
                    f'{flag_name(key)} ({previous.get(key)!r}, now {record[key]!r})' for key in changed
                )
            )
        place = place_of(path, state)
        run.continue_run(path, state.get('run'))
        load_parameters_and_solvers(path, {'solver': solver})
        for name, one in series.items():
            saved = state['series'].get(name)
            if saved is not None:
                try:
                    one.load_state_dict(saved)
                except (KeyError, TypeError, ValueError) as error:
                    raise DamagedCheckpoint(f'{path}/state.json: series {name}: {error}') from None
        return place

    return resume_newest(args.model_save_path, restore)[1]


# ---------------------------------------------------------------------------------------------
# Evaluation


def evaluate(
    predictor,
    data_root,
    names,
    label_maps,
    label_ids,
    split_instances=False,
    min_instance_area=0.002,
    tolerance=2,
):
    """Measures of the predictor on the photos `names` at their own resolution. Returns
    {'iou': {category: pooled IoU}, 'count_accuracy': {category: share}, 'boundary_f':
    {category: mean F over photos where the category is annotated or predicted},
    'per_photo': {name: mean IoU over the categories annotated or predicted there}, 'photos':
    {name: (photo, annotated class map, predicted class map)}}."""
    pairs = {category: [] for category in predictor.categories}
    counts = {category: ([], []) for category in predictor.categories}
    boundary_f = {category: [] for category in predictor.categories}
    per_photo, shown = {}, {}
    with Progress(len(names), 0, 'evaluate') as progress:
        for name in sorted(names):
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
            progress.update()
    iou = {}
    for category, sums in pairs.items():
        overlap, union = np.sum(sums, axis=0)
        iou[category] = 1.0 if union == 0 else float(overlap / union)
    return dict(
        iou=iou,
        count_accuracy={c: mp.instance_count_accuracy(*counts[c]) for c in predictor.categories},
        boundary_f={c: float(np.mean(f)) if f else 1.0 for c, f in boundary_f.items()},
        per_photo=per_photo,
        photos=shown,
    )


PALETTE = np.array(
    [[0, 0, 0], [0.25, 0.45, 1.0], [1.0, 0.3, 0.25], [0.3, 0.9, 0.3], [1.0, 0.85, 0.2], [0.8, 0.3, 1.0]]
)


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
        rows.append(
            [
                np.asarray(Image.fromarray(photo).resize(size[::-1], Image.BILINEAR)) / 255,
                label_panel(photo, annotated, size),
                label_panel(photo, predicted, size),
            ]
        )
    make_writable_folder(os.path.dirname(os.path.abspath(path)), '--cases-image')
    save_tile(path, rows)
    return best, worst


def report(results, categories):
    lines = [f'held-out photos: {len(results["per_photo"])}']
    for category in categories:
        lines.append(
            f'{category}: IoU {results["iou"][category]:.3f}, instance count accuracy '
            f'{results["count_accuracy"][category]:.3f}, boundary F '
            f'{results["boundary_f"][category]:.3f}'
        )
    return '\n'.join(lines)


def held_out_evaluation(args, predictor, names, label_maps, label_ids):
    """Evaluate `predictor` on the held-out photos `names`; print, draw the cases."""
    results = evaluate(
        predictor, args.data_root, names, label_maps, label_ids, args.split_instances, args.min_instance_area
    )
    print(report(results, predictor.categories))
    best, worst = draw_cases(args.cases_image, results)
    print(f'{args.cases_image}: best {", ".join(best)}; worst {", ".join(worst)} (top to bottom)')
    return results


# ---------------------------------------------------------------------------------------------
# Training


def learning_rate(base, epoch, max_epoch):
    """Cosine decay from `base` to a twentieth of it over the run."""
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * epoch / max_epoch)))


def build_training_graph(args):
    """(image, labels, one_hot, loss) variables of a training batch."""
    height, width = args.size
    n_classes = 1 + len(args.categories) + len(args.other_categories)
    image = nn.Variable((args.batch_size, 3, height, width))
    labels = nn.Variable((args.batch_size, 1, height, width))
    one_hot = nn.Variable((args.batch_size, 1 + len(args.categories), height, width))
    logits = mp.predictor_logits(image, n_classes, args.width, args.levels)
    loss = mp.segmentation_loss(logits, labels, one_hot)
    loss.persistent = True
    return image, labels, one_hot, loss


def export_predictor(folder, args, flag='--export'):
    """parameters.h5 (the predictor's only) and predictor.json into `folder`."""
    make_writable_folder(folder, flag)
    with nn.parameter_scope(mp.SCOPE):
        parameters = nn.get_parameters(grad_only=False)
    buffer = io.BytesIO()
    nn.save_parameters(
        buffer, {f'{mp.SCOPE}/{name}': value for name, value in parameters.items()}, extension='.h5'
    )
    write_bytes(os.path.join(folder, 'parameters.h5'), buffer.getvalue())
    mp.write_config(folder, args.categories, args.size, args.width, args.levels, args.other_categories)


def new_predictor(args):
    return mp.build_predictor(args.categories, args.size, args.width, args.levels, args.other_categories)


def train(args):
    label_maps, label_ids, held_out, args.other_categories = read_ccp(
        args.data_root, args.categories, args.test_fraction, args.split_seed, args.other_categories
    )
    held_out_names = sorted(set().union(*held_out.values()))
    accelerate = set_context(args.context, args.device_id)[1]
    nn.clear_parameters()
    nn.seed(args.seed)
    folders = {'--model-save-path': args.model_save_path, '--monitor-path': args.monitor_path}
    with Run(
        folders, args.monitor_path, mask_run_files(args.categories), args.resume, args.overwrite, args
    ) as run:
        train_names = [name for name in label_maps if name not in set(held_out_names)]
        print(
            f'training photos: {len(train_names)}; held out: {len(held_out_names)} ('
            + ', '.join(f'{c} {len(n)}' for c, n in held_out.items())
            + ')'
        )
        photos, classes = load_training_data(args.data_root, train_names, label_maps, label_ids, args.size)
        graph = build_training_graph(args)
        accelerate(graph[-1])
        solver = S.Adam(args.learning_rate)
        with nn.parameter_scope(mp.SCOPE):
            solver.set_parameters(nn.get_parameters())
        series = {
            name: SeriesFile(args.monitor_path, name, args.log_step if name == 'loss' else 1)
            for name in series_names(args.categories)
        }
        place = (0, 0, 0, 0.0)
        if args.resume:
            place = resume(args, run, solver, series)
            print(
                f'resumed at epoch {place[1]}, iteration {place[0]}'
                + (f', sample {place[2]} of the epoch' if place[2] else '')
            )
        run.start_training()
        held_out = (held_out_names, label_maps, label_ids[: len(args.categories)])
        train_epochs(args, run, graph, solver, series, (photos, classes), place, held_out)
        run.end_training()
        export_predictor(os.path.join(args.model_save_path, 'predictor'), args, '--model-save-path')
        print(f'predictor: {os.path.join(args.model_save_path, "predictor")}')
        held_out_evaluation(args, new_predictor(args), *held_out)


def train_epochs(args, run, graph, solver, series, data, place, held_out):
    """From `place` (iteration, epoch, samples of it trained on, seconds they took) to the end
    of --max-epoch, with a checkpoint after every epoch and where a stop signal asks for one;
    `held_out` is what evaluate needs besides the predictor and the data root."""
    image, labels, one_hot, loss = graph
    photos, classes = data
    iteration, first_epoch, samples, seconds = place
    dice_classes = 1 + len(args.categories)
    for epoch in range(first_epoch, args.max_epoch):
        started = time.monotonic() - seconds  # a resumed epoch counts its earlier part
        solver.set_learning_rate(learning_rate(args.learning_rate, epoch, args.max_epoch))
        order = epoch_order(classes, len(args.categories), args.negatives, args.seed, epoch)
        steps = len(order) // args.batch_size
        with Progress(
            steps, samples // args.batch_size, f'epoch {epoch + 1}/{args.max_epoch}', names=['loss']
        ) as progress:
            for images, batch_labels in batches(
                photos, classes, order, args.batch_size, args.size, args.seed, epoch, samples
            ):
                image.d, labels.d = images, batch_labels
                one_hot.d = mp.one_hot_planes(batch_labels, dice_classes)
                loss.forward(clear_no_need_grad=True)
                solver.zero_grad()
                loss.backward(clear_buffer=True)
                solver.update()
                value = float(loss.d)
                if not math.isfinite(value):
                    raise RunError(f'the loss is {value} at iteration {iteration}; lower --learning-rate')
                series['loss'].add(iteration, value)
                iteration += 1
                samples += args.batch_size
                progress.update({'loss': value})
                if run.stop.received:
                    run.stopped(
                        iteration,
                        save(
                            args, run, solver, series, iteration, epoch, samples, time.monotonic() - started
                        ),
                    )
        series['epoch_time'].add(epoch, time.monotonic() - started)
        if args.eval_interval and ((epoch + 1) % args.eval_interval == 0 or epoch + 1 == args.max_epoch):
            results = evaluate(new_predictor(args), args.data_root, *held_out)
            for category in args.categories:
                series[f'heldout_iou_{category}'].add(epoch, results['iou'][category])
            print(
                f'epoch {epoch + 1}: held-out IoU '
                + ', '.join(f'{c} {results["iou"][c]:.3f}' for c in args.categories),
                flush=True,
            )
        samples, seconds = 0, 0.0
        saved = save(args, run, solver, series, iteration, epoch + 1, 0, 0.0)
        if run.stop.received:
            run.stopped(iteration, saved)


def evaluate_saved(args):
    """--evaluate: the predictor folder -o, or the newest checkpoint in it, on the held-out
    photos; with --export, that predictor written as a predictor folder."""
    folder = args.model_save_path
    set_context(args.context, args.device_id)
    nn.clear_parameters()
    if os.path.isfile(os.path.join(folder, mp.CONFIG)):
        try:
            predictor = mp.load_predictor(folder)
        except (OSError, ValueError) as error:
            raise RunError(f'{folder}: {error}') from None
        print(
            f'{folder}: predictor of {", ".join(predictor.categories)} at '
            f'{predictor.size[0]}x{predictor.size[1]}'
        )
    else:
        paths = checkpoint_paths(folder) if os.path.isdir(folder) else []
        if not paths:
            raise RunError(f'--evaluate: neither a checkpoint nor {mp.CONFIG} in {folder}')
        state = read_checkpoint(paths[-1], ['args'])
        try:  # the network it was made with
            saved = {key: state['args'][key] for key in ['categories', 'size', 'width', 'levels']}
            predictor = mp.build_predictor(
                **saved, other_categories=state['args'].get('other_categories', [])
            )
        except (KeyError, TypeError, ValueError) as error:
            raise DamagedCheckpoint(
                f'{paths[-1]}/state.json: no predictor network in its args ({type(error).__name__}: {error})'
            ) from None
        load_parameters_and_solvers(paths[-1], {})
        _, epoch, samples, _ = place_of(paths[-1], state)
        print(f'{paths[-1]}: {epoch} epoch(s)' + (f' and {samples} samples' if samples else ''))
    args.categories, args.size = list(predictor.categories), list(predictor.size)
    args.width, args.levels = predictor.width, predictor.levels
    args.other_categories = list(predictor.other_categories)
    label_maps, label_ids, held_out, _ = read_ccp(
        args.data_root, args.categories, args.test_fraction, args.split_seed
    )
    held_out_evaluation(args, predictor, set().union(*held_out.values()), label_maps, label_ids)
    if args.export:
        export_predictor(args.export, args)
        print(f'predictor: {args.export}')


fraction = checked(float, lambda v: 0 <= v < 1, 'a number in [0, 1)')
positive_float = checked(float, lambda v: math.isfinite(v) and v > 0, 'a finite number > 0')
non_negative_float = checked(float, lambda v: math.isfinite(v) and v >= 0, 'a finite number >= 0')


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument(
        '--context', '-c', default='cpu', choices=['cpu', 'cudnn'], help='nnabla extension context'
    )
    parser.add_argument('--device-id', '-d', type=device_id, default='0')
    parser.add_argument('--batch-size', '-b', type=positive_int, default=8)
    parser.add_argument('--max-epoch', type=positive_int, default=40)
    parser.add_argument(
        '--learning-rate',
        type=positive_float,
        default=1e-3,
        help='Adam step size at the start; cosine decay to 1/20 of it',
    )
    parser.add_argument('--monitor-path', '-m', type=path, default='results/masks/monitor')
    parser.add_argument(
        '--model-save-path',
        '-o',
        type=path,
        default='results/masks/models',
        help='checkpoints; with --evaluate also a predictor folder',
    )
    parser.add_argument(
        '--data_root', type=path, default='datasets/clothing-co-parsing', help='a Clothing Co-Parsing copy'
    )
    parser.add_argument(
        '--categories',
        nargs='+',
        default=list(mp.DEFAULT_CATEGORIES),
        help='the CCP categories to predict (besides background)',
    )
    parser.add_argument(
        '--other-categories',
        nargs='*',
        default=list(mp.DEFAULT_OTHER_CATEGORIES),
        help='CCP categories learnt as classes of their own, so that the network tells them from '
        '--categories (coats from skirts); never predicted as masks. "all": every other one',
    )
    parser.add_argument(
        '--test-fraction',
        type=fraction,
        default=0.1,
        help='hold out the photos generate_ccp_dataset.py --test-fraction '
        'holds out for each category (0: none)',
    )
    parser.add_argument(
        '--split-seed', type=checked(int, lambda v: 0 <= v < 2**32, 'an integer in [0, 2**32)'), default=0
    )
    parser.add_argument(
        '--size',
        nargs=2,
        type=positive_int,
        default=list(mp.DEFAULT_SIZE),
        metavar=('H', 'W'),
        help='network input size',
    )
    parser.add_argument(
        '--width', type=positive_int, default=mp.DEFAULT_WIDTH, help='channels of the first U-Net level'
    )
    parser.add_argument(
        '--levels',
        type=checked(int, lambda v: 1 <= v <= 8, 'in [1, 8]'),
        default=mp.DEFAULT_LEVELS,
        help='U-Net levels',
    )
    parser.add_argument(
        '--negatives',
        type=non_negative_float,
        default=1.0,
        help='photos without any category per photo with one, in an epoch',
    )
    parser.add_argument('--seed', type=seed, default=0)
    parser.add_argument(
        '--log-step', type=positive_int, default=10, help='iterations per line of loss.series.txt'
    )
    parser.add_argument(
        '--eval-interval',
        type=checked(int, lambda v: v >= 0, 'an integer >= 0'),
        default=5,
        help='epochs between held-out IoU lines (0: none)',
    )
    start = parser.add_mutually_exclusive_group()
    start.add_argument(
        '--resume', action='store_true', help='go on from the newest intact checkpoint in --model-save-path'
    )
    start.add_argument(
        '--overwrite',
        action='store_true',
        help="start afresh where another run wrote: delete that run's "
        'checkpoints, predictor and series first',
    )
    parser.add_argument(
        '--evaluate',
        action='store_true',
        help='only evaluate, on the held-out photos, the predictor folder '
        '--model-save-path or the newest checkpoint in it',
    )
    parser.add_argument(
        '--export',
        type=path,
        help='with --evaluate: also write the evaluated predictor as a '
        'predictor folder (parameters.h5, predictor.json) here',
    )
    parser.add_argument(
        '--split-instances', action='store_true', help='evaluation: count 8-connected components as instances'
    )
    parser.add_argument(
        '--min-instance-area',
        type=fraction,
        default=0.002,
        help='evaluation, with --split-instances: smallest instance, as a share of the photo',
    )
    parser.add_argument(
        '--cases-image',
        type=path,
        default='imgs/mask_predictor_cases.png',
        help='picture of the best and worst held-out photos',
    )
    args = parser.parse_args(argv)
    if args.export and not args.evaluate:
        parser.error('--export goes with --evaluate (a finished run exports MODELS/predictor)')
    if args.evaluate and (args.resume or args.overwrite):
        parser.error('--evaluate reads --model-save-path; it neither resumes nor overwrites')
    if len(set(args.categories)) != len(args.categories):
        parser.error('--categories: each category once')
    named = args.categories + args.other_categories
    if len(set(named)) != len(named) or ('all' in args.other_categories and len(args.other_categories) > 1):
        parser.error('--other-categories: each category once, none of --categories; or "all" alone')
    try:
        mp.check_size(args.size, args.levels)
    except ValueError as error:
        parser.error(f'--size: {error}')
    return args


def main(argv=None):
    args = get_args(argv)
    try:
        evaluate_saved(args) if args.evaluate else train(args)
    except (ccp.DatasetError, OSError) as error:
        sys.exit(f'train_masks.py: {error}')
    except RunError as error:
        error.exit('train_masks.py')


if __name__ == '__main__':
    main()
