"""Translate images with their instance masks using a trained InstaGAN.

    python translate.py --model-save-path results/models --direction AtoB \\
        --dataroot datasets/ccp_sample --phase train --out results/translated
    python translate.py --params results/models/checkpoint_000000160/parameters.h5 \\
        --image photo.png --masks photo_0.png photo_1.png --out results/one
    python translate.py -o pretrained/jeans2skirt_64x44 --image photo.jpg --out results/one

Instances are translated K = --ins-per at a time, each pass on top of the previous pass's
image, as in training. Inputs of any size are resized to the network size and the results
written back at the input size: NAME.png, NAME_0.png, ... (the translation of mask 0, ...),
NAME_full.png (the photo at its own resolution with only the translated region replaced) and
NAME_tile.png (input | masks | output | output masks), with index.html listing every tile.

An image without masks (--image without --masks, or an image of {phase}A or {phase}B without
masks in its _seg folder) gets them from a mask predictor (mask_predictor.py, by default
pretrained/mask_predictor): the regions of the direction's source category (--source-category,
else the categories.json beside the model), split into instances as generate_ccp_dataset.py
does (--split-instances, --min-instance-area). They are written as NAME_mask_pred_0.png, ...
(0/255, the image's size), to be corrected and given back with --masks. An image in which the
predictor finds no instance is not translated.
"""

from runtime.signals import exit_at_once, handle_stop_signals

if __name__ == '__main__':  # before the slow imports, so that a Ctrl-C during them ends alike
    handle_stop_signals(exit_at_once)

import argparse
import html
import math
import os
import sys

import numpy as np
from scipy import ndimage
from tqdm import tqdm

import mask_predictor as mp
from args import add_instance_rule_flags, add_model_flags, check_instance_rule, checked, device_id, path
from data import (
    DataError,
    check_out_folder,
    largest_first,
    list_images,
    load_with_masks,
    mask_paths,
    read_photo,
    resize,
    resize_with_masks,
)
from runtime import RunError
from runtime.device import CONTEXTS, TYPE_CONFIGS, cuda_installed, set_context
from runtime.files import make_writable_folder, write_image, write_text
from runtime.monitors import image_panel, mask_panel, save_tile
from runtime.signals import StopRequest, exit_status
from translator import CATEGORIES, DIRECTIONS, FLAG_TYPES, load_translators, source_category

# Flags that default to the value saved with the model: help texts (types: FLAG_TYPES).
SAVED_FLAGS = {
    'ngf': 'generator width',
    'n_blocks': 'residual blocks per encoder',
    'ins_per': 'instances translated per pass',
    'fineSizeH': 'network input height (a multiple of 4, at least 8)',
    'fineSizeW': 'network input width (a multiple of 4, at least 8)',
}


def get_parser():
    parser = argparse.ArgumentParser(
        prog='translate.py',
        description=__doc__.split('\n')[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_flags(parser)
    parser.add_argument('--direction', choices=list(DIRECTIONS), default='AtoB')
    parser.add_argument(
        '--out',
        required=True,
        type=path,
        help='output folder: neither one holding an input nor a dataset folder',
    )
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument('--dataroot', type=path, help='a dataset folder: translates {phase}A or {phase}B')
    inputs.add_argument('--image', type=path, help='one image, with --masks or with masks predicted')
    parser.add_argument('--phase', type=path, help='with --dataroot: train, test, ... (test when not given)')
    parser.add_argument(
        '--masks', nargs='+', type=path, help='with --image: its instance masks (default: predicted)'
    )
    predicted = parser.add_argument_group(
        'predicted masks',
        'for an image without masks: --image without --masks, or an image '
        'of --dataroot without masks in its _seg folder',
    )
    predicted.add_argument(
        '--mask-predictor',
        type=path,
        help='a mask predictor folder (pretrained/mask_predictor when not given)',
    )
    predicted.add_argument(
        '--source-category',
        type=checked(str, bool, 'a category name'),
        help="the category of the direction's source domain, which the "
        f'predictor finds (from the {CATEGORIES} beside the model when '
        'not given)',
    )
    add_instance_rule_flags(predicted)
    parser.add_argument(
        '--no-full',
        dest='full',
        action='store_false',
        help='do not write NAME_full.png, the translated region pasted into the input at its own resolution',
    )
    parser.add_argument('--context', '-c', choices=CONTEXTS, default='cudnn' if cuda_installed() else 'cpu')
    parser.add_argument('--device-id', '-d', type=device_id, default='0')
    parser.add_argument('--type-config', '-t', choices=TYPE_CONFIGS, default='float')
    parser.add_argument('--cpu-conv', choices=['blas', 'nnabla'], default='blas')
    saved = parser.add_argument_group('network', 'default: as saved with the model')
    for name, text in SAVED_FLAGS.items():
        saved.add_argument('--' + name.replace('_', '-'), type=FLAG_TYPES[name], help=text)
    return parser


def get_args(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.dataroot and args.masks:
        parser.error(
            '--masks goes with --image; with --dataroot the masks are read from {phase}A_seg or {phase}B_seg'
        )
    if args.masks:
        for flag in ['mask_predictor', 'source_category', 'split_instances', 'min_instance_area']:
            if getattr(args, flag) not in (None, False):
                parser.error(f'--{flag.replace("_", "-")} goes with predicted masks, not with --masks')
    check_instance_rule(parser, args)
    if args.image and args.phase:
        parser.error('--phase goes with --dataroot, not with --image')
    if args.dataroot and not args.phase:
        args.phase = 'test'
    return args


def list_inputs(args):
    """[(image path, [mask paths])] to translate; no mask paths: masks to predict."""
    if args.image:
        masks = args.masks or []
        for file in [args.image] + masks:
            if not os.path.isfile(file):
                raise DataError(f'{file}: file not found')
        return [(args.image, masks)]
    folder = os.path.join(args.dataroot, args.phase + args.direction[0])
    return [(str(image), mask_paths(image)) for image in list_images(folder)]


def stem(image_path):
    return os.path.splitext(os.path.basename(image_path))[0]


def output_names(image_path, mask_count, full):
    """The files translate_one writes for an input: the translated image, the tile, the
    full-resolution photo (None without `full`) and the translated masks."""
    name = stem(image_path)
    return (
        name + '.png',
        name + '_tile.png',
        name + '_full.png' if full else None,
        [f'{name}_{i}.png' for i in range(mask_count)],
    )


def claim(writers, out, image, names):
    """Record in `writers` ({file name: input}) that `image` writes `names`; refuse a name
    another input writes (a.png and a_0.png: a's first mask)."""
    for name in filter(None, names):
        first = writers.setdefault(name, image)
        if first != image:
            raise DataError(f'{first} and {image} would both write {os.path.join(out, name)}; rename one')


def predicted_names(image, masks, full):
    """The files an input with predicted masks writes."""
    *names, mask_names = output_names(image, len(masks), full)
    return names + mask_names + mp.predicted_mask_names(stem(image), len(masks))


def check_output_names(args, inputs):
    """The writers of the output files ({name: input}), two inputs writing one refused. Of an
    input whose masks are to be predicted, only the names that do not depend on their number
    are known: the others are claimed once predicted."""
    writers = {}
    for image, masks in inputs:
        *names, mask_names = output_names(image, len(masks), args.full)
        claim(writers, args.out, image, names + mask_names)
    return writers


def to_size(array, size):
    """(C, h, w) values in [-1, 1] -> uint8 (H, W, C) resized to size (H, W)."""
    return np.stack(
        [resize(((np.clip(c, -1, 1) + 1) * 127.5).round().astype(np.uint8), size, 'bilinear') for c in array],
        axis=-1,
    )


def feather_width(photo_size, network_size):
    """Pixels over which NAME_full.png fades from the translation to the photo: at least 3, and
    at least one network pixel, the precision to which the upsampled masks place an edge."""
    return max(3, math.ceil(max(p / n for p, n in zip(photo_size, network_size))))


def paste_full(photo, translated, region, width):
    """The uint8 (H, W, 3) photo with `translated` (same shape) inside `region` (bool (H, W)),
    fading to the photo over `width` pixels outside it, and the photo's own pixels beyond."""
    if not region.any():
        return photo.copy()
    distance = ndimage.distance_transform_edt(~region)  # to the nearest region pixel
    weight = np.clip(1 - distance / width, 0, 1)[:, :, None]  # exactly 1 inside, 0 beyond
    return np.rint(weight * translated + (1 - weight) * photo).astype(np.uint8)


def translate_one(translator, image_path, masks, out, full=True):
    """Translate one input, its masks given as files, and write its files; returns the tile's
    file name."""
    photo, photo_masks = load_with_masks(image_path, masks)
    return translate_photo(translator, image_path, photo, photo_masks, out, full)


def translate_photo(translator, image_path, photo, photo_masks, out, full=True):
    """Translate the photo (uint8 (H, W, 3)) of `image_path` with its masks (bool (H, W) each)
    and write its files; returns the tile's file name."""
    image_name, tile_name, full_name, mask_names = output_names(image_path, len(photo_masks), full)
    image, mask_values = resize_with_masks(photo, photo_masks, translator.size)
    order = largest_first(mask_values)  # as in training
    image_out, sorted_out = translator(image, mask_values[order])
    masks_out = np.empty_like(sorted_out)
    masks_out[order] = sorted_out  # back in the order of the mask files

    photo_size = photo.shape[:2]
    translated = to_size(image_out, photo_size)
    translated_masks = [to_size(mask[None], photo_size)[:, :, 0] for mask in masks_out]
    write_image(os.path.join(out, image_name), translated)
    for name, mask in zip(mask_names, translated_masks):
        write_image(os.path.join(out, name), mask)
    if full:
        # The source masks are the binary files themselves; the translated ones are soft (the
        # generator's tanh, then the resize): above the middle of [-1, 1] counts as inside.
        region = np.any(photo_masks + [mask > 127 for mask in translated_masks], axis=0)
        write_image(
            os.path.join(out, full_name),
            paste_full(photo, translated, region, feather_width(photo_size, translator.size)),
        )
    save_tile(
        os.path.join(out, tile_name),
        [
            [
                image_panel(image[None]),
                mask_panel(mask_values[None]),
                image_panel(image_out[None]),
                mask_panel(masks_out[None]),
            ]
        ],
    )
    return tile_name


def write_index(out, tiles):
    rows = '\n'.join(f'<p>{html.escape(t)}<br><img src="{html.escape(t)}"></p>' for t in tiles)
    write_text(
        os.path.join(out, 'index.html'),
        '<!doctype html>\n<title>InstaGAN translations</title>\n'
        f'<p>input | masks | output | output masks</p>\n{rows}\n',
    )


class Prediction:
    """The masks of the inputs given none: the instances of the direction's source category
    that the mask predictor finds in each image."""

    def __init__(self, args, params_file, accelerate, unmasked):
        domain = args.direction[0]
        self.category = source_category(params_file, args.direction, args.source_category)
        if self.category is None:
            raise DataError(
                f'{unmasked} no masks: to predict them, give --source-category, the '
                f'category of domain {domain} (no {CATEGORIES} beside {params_file} '
                'names it)'
            )
        folder = args.mask_predictor or mp.DEFAULT_FOLDER
        self.shown = args.mask_predictor or os.path.relpath(mp.DEFAULT_FOLDER)
        self.predictor = mp.open_predictor(folder, [self.category], accelerate)
        self.split_instances, self.min_instance_area = args.split_instances, args.min_instance_area

    def __call__(self, image_path):
        """(photo uint8 (H, W, 3), its predicted instance masks); DataError where none."""
        photo = read_photo(image_path)
        masks = mp.source_instances(
            self.predictor, photo, self.category, self.split_instances, self.min_instance_area
        )
        if not masks:
            raise DataError(
                f'{image_path}: the mask predictor ({self.shown}) finds no '
                f'{self.category} in it; not translated'
            )
        return photo, masks


def prepare(args):
    """The inputs, the translator, what predicts the masks of the inputs without (None where
    every input has masks), the masks predicted for --image ({image: (photo, masks)}) and the
    writers of the output files (check_output_names); every check made, --image's masks
    predicted, before anything is written."""
    model = args.model_save_path or args.params
    inputs = list_inputs(args)
    given = {name: getattr(args, name) for name in SAVED_FLAGS}
    _, accelerate = set_context(args.context, args.device_id, args.type_config, args.cpu_conv)
    unmasked = [image for image, masks in inputs if not masks]
    # Slots beyond the most masks any input has would stay empty, which changes nothing; how
    # many masks are predicted is not known yet.
    most = None if unmasked else max(len(masks) for _, masks in inputs)
    params_file, _, translators = load_translators(model, [args.direction], given, accelerate, ins_cap=most)
    check_out_folder(
        args.out,
        [params_file] + [path for image, masks in inputs for path in [image] + masks],
        {'--dataroot': args.dataroot, '--model-save-path': args.model_save_path},
    )
    writers = check_output_names(args, inputs)
    prediction, predicted = None, {}
    if unmasked:
        prediction = Prediction(
            args,
            params_file,
            accelerate,
            f'{unmasked[0]} has' if args.image else f'{len(unmasked)} of {len(inputs)} inputs have',
        )
    if args.image and prediction:
        predicted[args.image] = prediction(args.image)
    make_writable_folder(args.out, '--out')
    if args.image and prediction:
        count = len(predicted[args.image][1])
        print(
            f'translate.py: no --masks: predicted {count} {prediction.category} instance(s) '
            f'with {prediction.shown}; see '
            f'{os.path.join(args.out, stem(args.image))}_mask_pred_*.png',
            file=sys.stderr,
        )
    elif prediction:
        seg = os.path.join(args.dataroot, args.phase + args.direction[0]) + '_seg'
        print(
            f'translate.py: {len(unmasked)} of {len(inputs)} inputs have no masks in {seg}: '
            f'their {prediction.category} instances are predicted with {prediction.shown}',
            file=sys.stderr,
        )
    return inputs, translators[args.direction], prediction, predicted, writers


def translate_input(args, translator, prediction, predicted, writers, image_path, masks):
    """Translate one input, predicting its masks if it has none; returns the tile's name."""
    if masks:
        return translate_one(translator, image_path, masks, args.out, args.full)
    photo, found = predicted.get(image_path) or prediction(image_path)
    claim(writers, args.out, image_path, predicted_names(image_path, found, args.full))
    mp.write_predicted_masks(args.out, stem(image_path), found)
    return translate_photo(translator, image_path, photo, found, args.out, args.full)


def main(argv=None):
    args = get_args(argv)
    try:
        inputs, translator, prediction, predicted, writers = prepare(args)
    except RunError as error:
        sys.exit(f'translate.py: {error}')

    tiles, failures = [], 0
    with StopRequest('stopping after this input') as stop:
        stop.deferring = True
        try:
            with tqdm(inputs, desc='translating', dynamic_ncols=True, disable=None) as progress:
                for image_path, masks in progress:
                    if stop.received:
                        break
                    try:
                        tiles.append(
                            translate_input(
                                args, translator, prediction, predicted, writers, image_path, masks
                            )
                        )
                    except DataError as error:
                        failures += 1
                        tqdm.write(f'translate.py: {error}', file=sys.stderr)
            write_index(args.out, tiles)
        except RunError as error:  # a write that failed: the disk, not the input
            sys.exit(f'translate.py: {error}; stopped after {len(tiles)} of {len(inputs)} inputs')
    if stop.received:
        print(
            f'translate.py: stopped by {stop.name} after {len(tiles) + failures} of '
            f'{len(inputs)} inputs ({failures} failed); '
            f'{os.path.join(args.out, "index.html")} lists the translated ones',
            file=sys.stderr,
        )
        sys.exit(exit_status(stop.received))
    if failures:
        sys.exit(f'translate.py: {failures} of {len(inputs)} inputs failed')


if __name__ == '__main__':
    main()
