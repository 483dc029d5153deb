"""Translate images with their instance masks using a trained InstaGAN.

    python translate.py --model-save-path results/models --direction AtoB \\
        --dataroot datasets/ccp_sample --phase train --out results/translated
    python translate.py --params results/models/checkpoint_000000160/parameters.h5 \\
        --image photo.png --masks photo_0.png photo_1.png --out results/one

Instances are translated K = --ins-per at a time, each pass on top of the previous pass's
image, as in training. Inputs of any size are resized to the network size and the results
written back at the input size: NAME.png, NAME_0.png, ... and NAME_tile.png
(input | masks | output | output masks), with index.html listing every tile.
"""
import argparse
import html
import json
import math
import os
import sys

import numpy as np
import nnabla as nn
from nnabla.ext_utils import get_extension_context
from PIL import Image
from tqdm import tqdm

import cpu_functions
import models
from data import DataError, list_images, load_resized, mask_areas, mask_paths
from train import (checkpoint_paths, cuda_installed, image_panel, mask_panel, save_tile,
                   write_png)

# Flags that default to the value saved with the checkpoint.
SAVED_ARGS = ['ngf', 'n_blocks', 'ins_per', 'fineSizeH', 'fineSizeW']


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument('--model-save-path', '-o', help="a training run's checkpoint folder: "
                                                       'its newest checkpoint is used')
    model.add_argument('--params', help='a parameters.h5 file')
    parser.add_argument('--direction', choices=['AtoB', 'BtoA'], default='AtoB')
    parser.add_argument('--out', required=True, help='output folder')
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument('--dataroot', help='a dataset folder: translates {phase}A or {phase}B')
    inputs.add_argument('--image', help='one image, with --masks')
    parser.add_argument('--phase', default='val', help='with --dataroot: train, val, ...')
    parser.add_argument('--masks', nargs='+', default=[], help='instance masks of --image')
    parser.add_argument('--context', '-c', choices=['cpu', 'cudnn'],
                        default='cudnn' if cuda_installed() else 'cpu')
    parser.add_argument('--device-id', '-d', default='0')
    parser.add_argument('--cpu-conv', choices=['blas', 'nnabla'], default='blas')
    saved = parser.add_argument_group('network', 'default: as saved with the checkpoint')
    saved.add_argument('--ngf', type=int)
    saved.add_argument('--n-blocks', type=int)
    saved.add_argument('--ins-per', type=int, help='instances translated per pass')
    saved.add_argument('--fineSizeH', type=int, help='network input height (multiple of 4)')
    saved.add_argument('--fineSizeW', type=int, help='network input width (multiple of 4)')
    return parser.parse_args(argv)


def load_config(args):
    """Find the parameter file and fill the network flags left unset from its state.json."""
    if args.model_save_path:
        checkpoints = checkpoint_paths(args.model_save_path) \
            if os.path.isdir(args.model_save_path) else []
        if not checkpoints:
            raise DataError('{}: no checkpoint found'.format(args.model_save_path))
        args.params = os.path.join(checkpoints[-1], 'parameters.h5')
    if not os.path.isfile(args.params):
        raise DataError('{}: parameter file not found'.format(args.params))
    state_path = os.path.join(os.path.dirname(args.params), 'state.json')
    saved = {}
    if os.path.exists(state_path):
        with open(state_path) as f:
            saved = json.load(f)['args']
    for name in SAVED_ARGS:
        if getattr(args, name) is None:
            if name not in saved:
                raise DataError('{}: no state.json beside it; give --{}'.format(
                    args.params, name.replace('_', '-')))
            setattr(args, name, saved[name])
    for name in ['fineSizeH', 'fineSizeW']:
        if getattr(args, name) % 4:
            raise DataError('--{} {} is not a multiple of 4'.format(name, getattr(args, name)))


class Translator:
    """A generator pass graph for one image and K instance slots, run once per pass."""

    def __init__(self, args):
        scope = 'generator_x2y' if args.direction == 'AtoB' else 'generator_y2x'
        self.size = (args.fineSizeH, args.fineSizeW)
        self.ins_per = args.ins_per
        nn.clear_parameters()
        nn.load_parameters(args.params)
        with nn.parameter_scope(scope):
            saved = set(nn.get_parameters(grad_only=False))
        self.image = nn.Variable((1, 3) + self.size)
        self.masks = nn.Variable((1, self.ins_per) + self.size)
        mismatch = DataError('{}: made with other network sizes than --ngf {} --n-blocks {}'
                             .format(args.params, args.ngf, args.n_blocks))
        try:
            with nn.parameter_scope(scope), nn.no_grad():  # keeps no buffer for a backward
                self.image_out, self.masks_out, _ = models.generator_pass(
                    self.image, self.masks, args.ngf, args.n_blocks)
                used = set(nn.get_parameters(grad_only=False))
        except ValueError:  # nnabla: a saved parameter has another shape
            raise mismatch
        if used != saved:  # other --n-blocks: parameters missing from the file or left over
            raise mismatch
        self.image_out.persistent = self.masks_out.persistent = True

    def __call__(self, image, masks):
        """(3, H, W) image and (N, H, W) masks in [-1, 1] at the network size -> translations."""
        passes = max(1, math.ceil(len(masks) / self.ins_per))
        slots = np.full((passes * self.ins_per,) + self.size, -1, np.float32)
        slots[:len(masks)] = masks
        translated = np.empty_like(slots)
        for p in range(passes):
            pass_slots = slice(p * self.ins_per, (p + 1) * self.ins_per)
            self.image.d, self.masks.d = image[None], slots[None, pass_slots]
            nn.forward_all([self.image_out, self.masks_out], clear_buffer=True)
            image, translated[pass_slots] = self.image_out.d[0].copy(), self.masks_out.d[0]
        return image, translated[:len(masks)]


def to_size(array, size):
    """(C, h, w) values in [-1, 1] -> uint8 (H, W, C) resized to size (H, W)."""
    channels = [Image.fromarray(((np.clip(c, -1, 1) + 1) * 127.5).round().astype(np.uint8))
                .resize((size[1], size[0]), Image.BILINEAR) for c in array]
    return np.stack([np.asarray(c) for c in channels], axis=-1)


def translate_one(translator, image_path, masks, out):
    """Translate one input and write its files; returns the tile's file name."""
    if not masks:
        raise DataError('{}: no instance mask given or found'.format(image_path))
    image, mask_values, input_size = load_resized(image_path, masks, translator.size)
    # Largest instance first, as in training.
    mask_values = mask_values[np.argsort(-mask_areas(mask_values), kind='stable')]
    image_out, masks_out = translator(image, mask_values)

    name = os.path.splitext(os.path.basename(image_path))[0]
    write_png(os.path.join(out, name + '.png'), to_size(image_out, input_size))
    for i, mask in enumerate(masks_out):
        write_png(os.path.join(out, '{}_{}.png'.format(name, i)),
                  to_size(mask[None], input_size)[:, :, 0])
    tile_name = name + '_tile.png'
    save_tile(os.path.join(out, tile_name),
              [[image_panel(image[None]), mask_panel(mask_values[None]),
                image_panel(image_out[None]), mask_panel(masks_out[None])]])
    return tile_name


def write_index(out, tiles):
    rows = '\n'.join('<p>{0}<br><img src="{0}"></p>'.format(html.escape(t)) for t in tiles)
    partial = os.path.join(out, 'index.partial.html')
    with open(partial, 'w') as f:
        f.write('<!doctype html>\n<title>InstaGAN translations</title>\n'
                '<p>input | masks | output | output masks</p>\n{}\n'.format(rows))
    os.replace(partial, os.path.join(out, 'index.html'))


def main(argv=None):
    args = get_args(argv)
    try:
        load_config(args)
        if args.image:
            inputs = [(args.image, args.masks)]
        else:
            folder = os.path.join(args.dataroot, args.phase + args.direction[0])
            inputs = [(str(path), mask_paths(path)) for path in list_images(folder)]
        nn.set_default_context(get_extension_context(args.context, device_id=args.device_id))
        translator = Translator(args)
        if args.context == 'cpu' and args.cpu_conv == 'blas':  # as train.set_context
            cpu_functions.accelerate(translator.image_out, translator.masks_out)
        os.makedirs(args.out, exist_ok=True)
    except (DataError, ImportError, OSError) as error:
        sys.exit('translate.py: {}'.format(error))

    tiles, failures = [], 0
    for image_path, masks in tqdm(inputs, desc='translating', dynamic_ncols=True):
        try:
            tiles.append(translate_one(translator, image_path, masks, args.out))
        except (DataError, OSError) as error:
            failures += 1
            tqdm.write('translate.py: {}'.format(error), file=sys.stderr)
    write_index(args.out, tiles)
    if failures:
        sys.exit('translate.py: {} of {} inputs failed'.format(failures, len(inputs)))


if __name__ == '__main__':
    main()
