"""Translate images with their instance masks using a trained InstaGAN.

    python translate.py --model-save-path results/models --direction AtoB \\
        --dataroot datasets/ccp_sample --phase train --out results/translated
    python translate.py --params results/models/checkpoint_000000160/parameters.h5 \\
        --image photo.png --masks photo_0.png photo_1.png --out results/one

Instances are translated K = --ins-per at a time, each pass on top of the previous pass's
image, as in training. Inputs of any size are resized to the network size and the results
written back at the input size: NAME.png, NAME_0.png, ... (the translation of mask 0, ...),
NAME_full.png (the photo at its own resolution with only the translated region replaced) and
NAME_tile.png (input | masks | output | output masks), with index.html listing every tile.
"""
import os
import signal
import sys

from args import STOP_SIGNALS, exit_at_once, handle_stop_signals

if __name__ == '__main__':  # before the slow imports, so that a Ctrl-C during them ends alike
    handle_stop_signals(exit_at_once)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import html  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402
import nnabla as nn  # noqa: E402
from nnabla.ext_utils import get_extension_context  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import ndimage  # noqa: E402
from tqdm import tqdm  # noqa: E402

import models  # noqa: E402
from args import checked, device_id, non_negative_int, path, positive_int  # noqa: E402
from data import (DataError, list_images, load_with_masks, mask_areas, mask_paths,  # noqa: E402
                  resize_with_masks)
from train import (checkpoint_paths, cuda_installed, graph_engine,  # noqa: E402
                   image_panel, make_writable_folder, mask_panel, save_tile, write_png,
                   write_text)


def h5_file(text):
    if not path(text).endswith('.h5'):
        raise argparse.ArgumentTypeError('{} is not a .h5 file'.format(text))
    return text


# The generator's residual blocks reflect-pad their H/4 x W/4 maps by one pixel, which needs
# two; the two stride-2 convolutions and their transposes need multiples of 4.
FINE_SIZE = checked(int, lambda v: v >= 8 and v % 4 == 0, 'a multiple of 4, at least 8')
# Flags that default to the value saved with the checkpoint: (type, help).
SAVED_FLAGS = {
    'ngf': (positive_int, 'generator width'),
    'n_blocks': (non_negative_int, 'residual blocks per encoder'),
    'ins_per': (positive_int, 'instances translated per pass'),
    'fineSizeH': (FINE_SIZE, 'network input height (a multiple of 4, at least 8)'),
    'fineSizeW': (FINE_SIZE, 'network input width (a multiple of 4, at least 8)'),
}


def get_parser():
    parser = argparse.ArgumentParser(prog='translate.py', description=__doc__.split('\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument('--model-save-path', '-o', type=path,
                       help="a training run's checkpoint folder: its newest checkpoint is used")
    model.add_argument('--params', type=h5_file, help='a parameters.h5 file')
    parser.add_argument('--direction', choices=['AtoB', 'BtoA'], default='AtoB')
    parser.add_argument('--out', required=True, type=path,
                        help='output folder: neither one holding an input nor a dataset folder')
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument('--dataroot', type=path,
                        help='a dataset folder: translates {phase}A or {phase}B')
    inputs.add_argument('--image', type=path, help='one image, with --masks')
    parser.add_argument('--phase', type=path, help='with --dataroot: train, val, ... '
                                                        '(val when not given)')
    parser.add_argument('--masks', nargs='+', type=path,
                        help='with --image: its instance masks')
    parser.add_argument('--no-full', dest='full', action='store_false',
                        help='do not write NAME_full.png, the translated region pasted into '
                             'the input at its own resolution')
    parser.add_argument('--context', '-c', choices=['cpu', 'cudnn'],
                        default='cudnn' if cuda_installed() else 'cpu')
    parser.add_argument('--device-id', '-d', type=device_id, default='0')
    parser.add_argument('--cpu-conv', choices=['blas', 'nnabla'], default='blas')
    saved = parser.add_argument_group('network', 'default: as saved with the checkpoint')
    for name, (kind, text) in SAVED_FLAGS.items():
        saved.add_argument('--' + name.replace('_', '-'), type=kind, help=text)
    return parser


def get_args(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.dataroot and args.masks:
        parser.error('--masks goes with --image; with --dataroot the masks are read from '
                     '{phase}A_seg or {phase}B_seg')
    if args.image and not args.masks:
        parser.error('--image needs its instance masks: --masks NAME_0.png ...')
    if args.image and args.phase:
        parser.error('--phase goes with --dataroot, not with --image')
    if args.context == 'cudnn' and not cuda_installed():
        parser.error('--context cudnn needs nnabla-ext-cuda, which is not installed '
                     '(pip install -r requirements-cuda.txt)')
    if args.dataroot and not args.phase:
        args.phase = 'val'
    return args


def read_state(path):
    """The network flags saved in a checkpoint's state.json, each checked as its flag is."""
    try:
        with open(path, encoding='utf-8') as f:
            saved = json.load(f)['args']
        items = [(name, saved[name]) for name in SAVED_FLAGS if name in saved]
    except (OSError, ValueError, KeyError, TypeError) as error:  # ValueError: not JSON, UTF-8
        raise DataError('{}: unreadable or damaged ({}: {})'.format(
            path, type(error).__name__, error)) from None
    values = {}
    for name, value in items:
        try:
            values[name] = SAVED_FLAGS[name][0](str(value))
        except argparse.ArgumentTypeError as error:
            raise DataError('{}: damaged: args.{}: {}'.format(path, name, error)) from None
    return values


def load_config(args):
    """Find the parameter file and fill the network flags left unset from the state.json
    beside it. Returns the files read."""
    if args.model_save_path:
        checkpoints = checkpoint_paths(args.model_save_path) \
            if os.path.isdir(args.model_save_path) else []
        if not checkpoints:
            raise DataError('{}: no checkpoint found'.format(args.model_save_path))
        args.params = os.path.join(checkpoints[-1], 'parameters.h5')
    if not os.path.isfile(args.params):
        raise DataError('{}: parameter file not found'.format(args.params))
    state_path = os.path.join(os.path.dirname(args.params), 'state.json')
    has_state = os.path.exists(state_path)
    saved = read_state(state_path) if has_state else {}
    for name in SAVED_FLAGS:
        if getattr(args, name) is None:
            if name not in saved:
                raise DataError('{}: {}; give --{}'.format(
                    args.params, 'its state.json has no ' + name if has_state else
                    'no state.json beside it', name.replace('_', '-')))
            setattr(args, name, saved[name])
    return [args.params, state_path] if has_state else [args.params]


def list_inputs(args):
    """[(image path, [mask paths])] to translate."""
    if args.image:
        for file in [args.image] + args.masks:
            if not os.path.isfile(file):
                raise DataError('{}: file not found'.format(file))
        return [(args.image, args.masks)]
    folder = os.path.join(args.dataroot, args.phase + args.direction[0])
    return [(str(image), mask_paths(image)) for image in list_images(folder)]


def output_names(image_path, mask_count, full):
    """The files translate_one writes for an input: the translated image, the tile, the
    full-resolution photo (None without `full`) and the translated masks."""
    name = os.path.splitext(os.path.basename(image_path))[0]
    return (name + '.png', name + '_tile.png', name + '_full.png' if full else None,
            ['{}_{}.png'.format(name, i) for i in range(mask_count)])


def check_out_folder(args, files_read):
    """Refuse, before anything is written, an --out that could overwrite an input or mix the
    outputs into a dataset: the folder of a file read, the --dataroot or --model-save-path
    folder, a dataset's mask folder (NAME_seg) or image folder (beside NAME_seg). Symlinks and
    relative paths are resolved first."""
    out = os.path.realpath(args.out)
    refusals = [(os.path.dirname(os.path.realpath(path)), 'holds the input {}'.format(path))
                for path in files_read]
    for flag in ['dataroot', 'model_save_path']:
        if getattr(args, flag):
            refusals.append((os.path.realpath(getattr(args, flag)),
                             'is the --{} folder'.format(flag.replace('_', '-'))))
    if out.endswith('_seg'):
        refusals.append((out, "is a dataset's mask folder"))
    if os.path.isdir(out + '_seg'):
        refusals.append((out, "is a dataset's image folder (beside {}_seg)".format(args.out)))
    for folder, reason in refusals:
        if folder == out:
            raise DataError('--out {} {}; choose another folder'.format(args.out, reason))
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError('--out {} is a file'.format(args.out))


def make_out_folder(out):
    try:
        make_writable_folder(out)
    except OSError as error:
        raise DataError('--out {}: not a writable folder ({})'.format(out, error.strerror))


def check_output_names(args, inputs):
    """Refuse two inputs that would write the same file (a.png and a_0.png: a's first mask)."""
    writer = {}
    for image, masks in inputs:
        *names, mask_names = output_names(image, len(masks), args.full)
        for name in filter(None, names + mask_names):
            first = writer.setdefault(name, image)
            if first != image:
                raise DataError('{} and {} would both write {}; rename one'.format(
                    first, image, os.path.join(args.out, name)))


def load_generator(path, scope):
    """{name: array} of the parameters under `scope` in a parameter file (names within it)."""
    nn.clear_parameters()
    try:
        nn.load_parameters(path)
    except Exception as error:  # h5py reports damage with several exception types
        raise DataError('{}: damaged or not a parameter file ({}: {})'.format(
            path, type(error).__name__, str(error).split('\n')[0])) from None
    with nn.parameter_scope(scope):
        saved = {name: p.d.copy() for name, p in nn.get_parameters(grad_only=False).items()}
    nn.clear_parameters()
    if not saved:
        raise DataError('{}: holds no {} parameters'.format(path, scope))
    return saved


def generator_sizes(parameters):
    """--ngf and --n-blocks of a generator, read from the names and shapes models.py gives
    its parameters (None where the file has no stem convolution)."""
    stem = parameters.get('image_encoder/stem/W')
    blocks = {name.split('/')[1] for name in parameters if name.startswith('image_encoder/res')}
    return {'ngf': None if stem is None else stem.shape[0], 'n_blocks': len(blocks)}


def parameter_problem(saved, needed):
    """What is wrong with a saved parameter (array or None) for the graph's (Variable or None)."""
    if saved is None:
        return 'is missing, and the generator needs it'
    if needed is None:
        return 'is not used by the generator'
    if saved.shape != needed.shape:
        return 'is {}, the generator needs {}'.format(saved.shape, needed.shape)
    if not np.isfinite(saved).all():
        return 'holds NaN or infinite values'
    return None


def flags_text(values):
    return ' '.join('--{} {}'.format(name.replace('_', '-'), value)
                    for name, value in values.items())


class Translator:
    """A generator pass graph for one image and K instance slots, run once per pass."""

    def __init__(self, args):
        scope = 'generator_x2y' if args.direction == 'AtoB' else 'generator_y2x'
        self.size = (args.fineSizeH, args.fineSizeW)
        self.ins_per = args.ins_per
        saved = load_generator(args.params, scope)
        # Checked before the graph is built: a wrong --ngf could ask for any amount of memory.
        file_sizes = {name: size for name, size in generator_sizes(saved).items()
                      if size is not None and size != getattr(args, name)}
        if file_sizes:
            raise DataError('{} was made with {}, not {}'.format(args.params, flags_text(
                file_sizes), flags_text({name: getattr(args, name) for name in file_sizes})))
        self.image = nn.Variable((1, 3) + self.size)
        self.masks = nn.Variable((1, self.ins_per) + self.size)
        with nn.parameter_scope(scope), nn.no_grad():  # keeps no buffer for a backward
            self.image_out, self.masks_out, _ = models.generator_pass(
                self.image, self.masks, args.ngf, args.n_blocks)
            needed = nn.get_parameters(grad_only=False)  # an empty store before: the graph's
        for name in sorted(set(needed) | set(saved)):
            problem = parameter_problem(saved.get(name), needed.get(name))
            if problem:
                raise DataError('{}: {}/{} {}'.format(args.params, scope, name, problem))
            needed[name].d = saved[name]
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
    """Translate one input and write its files; returns the tile's file name."""
    if not masks:
        raise DataError('{}: no instance mask given or found'.format(image_path))
    image_name, tile_name, full_name, mask_names = output_names(image_path, len(masks), full)
    photo, photo_masks = load_with_masks(image_path, masks)
    image, mask_values = resize_with_masks(photo, photo_masks, translator.size)
    order = np.argsort(-mask_areas(mask_values), kind='stable')  # largest first, as in training
    image_out, sorted_out = translator(image, mask_values[order])
    masks_out = np.empty_like(sorted_out)
    masks_out[order] = sorted_out  # back in the order of the mask files

    photo_size = (photo.height, photo.width)
    translated = to_size(image_out, photo_size)
    translated_masks = [to_size(mask[None], photo_size)[:, :, 0] for mask in masks_out]
    write_png(os.path.join(out, image_name), translated)
    for name, mask in zip(mask_names, translated_masks):
        write_png(os.path.join(out, name), mask)
    if full:
        # The source masks are the binary files themselves; the translated ones are soft (the
        # generator's tanh, then the resize): above the middle of [-1, 1] counts as inside.
        region = np.any(photo_masks + [mask > 127 for mask in translated_masks], axis=0)
        write_png(os.path.join(out, full_name), paste_full(
            np.asarray(photo), translated, region, feather_width(photo_size, translator.size)))
    save_tile(os.path.join(out, tile_name),
              [[image_panel(image[None]), mask_panel(mask_values[None]),
                image_panel(image_out[None]), mask_panel(masks_out[None])]])
    return tile_name


def write_index(out, tiles):
    rows = '\n'.join('<p>{0}<br><img src="{0}"></p>'.format(html.escape(t)) for t in tiles)
    write_text(os.path.join(out, 'index.html'),
               '<!doctype html>\n<title>InstaGAN translations</title>\n'
               '<p>input | masks | output | output masks</p>\n{}\n'.format(rows))


@contextlib.contextmanager
def stop_requests():
    """While translating, the first Ctrl-C or SIGTERM asks to stop after the current input, so
    that every file written is complete; a second one ends at once. Yields the signals."""
    received = []

    def request(signum, frame):
        received.append(signum)
        os.write(2, '\ntranslate.py: {}: stopping after this input (again: at once)\n'.format(
            signal.Signals(signum).name).encode())
        handle_stop_signals(exit_at_once)

    previous = {s: signal.signal(s, request) for s in STOP_SIGNALS}
    try:
        yield received
    finally:
        for stop_signal, handler in previous.items():
            signal.signal(stop_signal, handler)


def main(argv=None):
    args = get_args(argv)
    try:
        files_read = load_config(args)
        inputs = list_inputs(args)
        check_out_folder(args, files_read + [path for image, masks in inputs
                                             for path in [image] + masks])
        check_output_names(args, inputs)
        nn.set_default_context(get_extension_context(args.context, device_id=args.device_id))
        # Slots beyond the most masks any input has would stay empty, which changes nothing.
        args.ins_per = min(args.ins_per, max(1, max(len(masks) for _, masks in inputs)))
        translator = Translator(args)
        graph_engine(args.context, args.cpu_conv)(translator.image_out, translator.masks_out)
        make_out_folder(args.out)
    except (DataError, ImportError, OSError) as error:
        sys.exit('translate.py: {}'.format(error))

    tiles, failures = [], 0
    with stop_requests() as stopped:
        with tqdm(inputs, desc='translating', dynamic_ncols=True) as progress:
            for image_path, masks in progress:
                if stopped:
                    break
                try:
                    tiles.append(translate_one(translator, image_path, masks, args.out,
                                               args.full))
                except (DataError, OSError) as error:
                    failures += 1
                    tqdm.write('translate.py: {}'.format(error), file=sys.stderr)
        write_index(args.out, tiles)
    if stopped:
        print('translate.py: stopped by {} after {} of {} inputs ({} failed); {} lists the '
              'translated ones'.format(signal.Signals(stopped[0]).name, len(tiles) + failures,
                                       len(inputs), failures,
                                       os.path.join(args.out, 'index.html')), file=sys.stderr)
        sys.exit(128 + stopped[0])
    if failures:
        sys.exit('translate.py: {} of {} inputs failed'.format(failures, len(inputs)))


if __name__ == '__main__':
    main()
