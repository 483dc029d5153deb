"""A trained InstaGAN generator, ready to translate: shared by translate.py, evaluate.py,
bench.py and export.py.

A model is found in any form this project writes: a run's --model-save-path folder (its newest
complete checkpoint), a checkpoint folder, a pretrained/ folder, or a parameters.h5 file. The
network flags (--ngf, --n-blocks, --ins-per, the network size) come from the state.json beside
the parameters where there is one, --ngf and --n-blocks also from the parameters' own shapes;
whatever is given explicitly wins. The categories of its domains (what a mask predictor looks
for in a photo to translate) come from the categories.json beside the parameters where there
is one, {"A": "jeans", "B": "skirt"} for pretrained/jeans2skirt_64x44.
"""

import argparse
import json
import os
from dataclasses import dataclass

import nnabla as nn
import numpy as np

import models
from args import network_size, non_negative_int, positive_int
from data import DataError
from runtime.checkpoints import checkpoint_paths, read_parameters
from runtime.device import check_memory

DIRECTIONS = {'AtoB': 'generator_x2y', 'BtoA': 'generator_y2x'}
CATEGORIES = 'categories.json'


# The flags that size a generator, and their types.
FLAG_TYPES = {
    'ngf': positive_int,
    'n_blocks': non_negative_int,
    'ins_per': positive_int,
    'fineSizeH': network_size,
    'fineSizeW': network_size,
}


@dataclass
class NetworkConfig:
    ngf: int
    n_blocks: int
    ins_per: int
    fineSizeH: int
    fineSizeW: int

    @property
    def size(self):
        return (self.fineSizeH, self.fineSizeW)


def find_parameters(path):
    """The parameters.h5 of a model given in any of the forms above."""
    if os.path.isfile(path):
        return path
    if os.path.isfile(os.path.join(path, 'parameters.h5')):
        return os.path.join(path, 'parameters.h5')
    checkpoints = checkpoint_paths(path) if os.path.isdir(path) else []
    if checkpoints:
        return os.path.join(checkpoints[-1], 'parameters.h5')
    raise DataError(
        f"{path}: no model found (give a run's --model-save-path, a checkpoint "
        'folder, a pretrained/ folder or a parameters.h5)'
    )


def read_saved_flags(params_file):
    """The network flags saved in the state.json beside a parameter file, if there is one, each
    checked for type and range."""
    path = os.path.join(os.path.dirname(params_file), 'state.json')
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding='utf-8') as f:
            saved = json.load(f)['args']
        if not isinstance(saved, dict):
            raise TypeError('args is not an object')
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f'{path}: unreadable or damaged ({type(error).__name__}: {error})') from None
    flags = {}
    for name, kind in FLAG_TYPES.items():
        if name in saved:
            try:
                flags[name] = kind(str(saved[name]))
            except argparse.ArgumentTypeError as error:
                raise DataError(f'{path}: damaged: args.{name}: {error}') from None
    return flags


def read_categories(params_file):
    """{domain: category} of the categories.json beside a parameter file, {} without one."""
    path = os.path.join(os.path.dirname(params_file), CATEGORIES)
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding='utf-8') as f:
            categories = json.load(f)
        if not (
            isinstance(categories, dict)
            and set(categories) == {'A', 'B'}
            and all(isinstance(name, str) and name for name in categories.values())
        ):
            raise ValueError('not {"A": category, "B": category}')
    except (OSError, ValueError) as error:
        raise DataError(f'{path}: unreadable or damaged ({type(error).__name__}: {error})') from None
    return categories


def source_category(params_file, direction, given=None):
    """The category of the direction's source domain: `given`, else categories.json's; None
    where neither names it."""
    return given or read_categories(params_file).get(direction[0])


def generator_parameters(params_file, direction):
    """{name: array} of one direction's generator, today's names (models.current_parameter_name)."""
    scope = DIRECTIONS[direction] + '/'
    try:
        arrays = read_parameters(params_file, models.current_parameter_name)
    except Exception as error:  # h5py reports damage with several exception types
        reason = str(error).split('\n')[0]
        raise DataError(
            f'{params_file}: damaged or not a parameter file ({type(error).__name__}: {reason})'
        ) from None
    found = {name[len(scope) :]: array for name, array in arrays.items() if name.startswith(scope)}
    if not found:
        raise DataError(f'{params_file}: holds no {scope[:-1]} parameters (not a generator file)')
    return found


def file_sizes(parameters):
    """--ngf and --n-blocks of a generator, read from the names and shapes models.py gives its
    parameters (ngf None where the file has no stem convolution)."""
    stem = parameters.get('image_encoder/stem/conv/W')
    blocks = {name.split('/')[1] for name in parameters if name.startswith('image_encoder/res')}
    return {'ngf': None if stem is None else stem.shape[0], 'n_blocks': len(blocks)}


def flags_text(values):
    return ' '.join(f'--{name.replace("_", "-")} {value}' for name, value in values.items())


def network_config(params_file, given=None):
    """The NetworkConfig of a parameter file: `given` flags first, then state.json, then the
    parameters' shapes; all missing ones are named in one line."""
    flags = {**read_saved_flags(params_file), **{k: v for k, v in (given or {}).items() if v is not None}}
    for name, size in file_sizes(generator_parameters(params_file, 'AtoB')).items():
        if size is not None:
            flags.setdefault(name, size)
    missing = [name for name in NetworkConfig.__annotations__ if name not in flags]
    if missing:
        listed = ' '.join(f'--{name.replace("_", "-")} N' for name in missing)
        state = os.path.join(os.path.dirname(params_file), 'state.json')
        source = 'its state.json does not say' if os.path.exists(state) else 'no state.json beside it says'
        raise DataError(f'{params_file}: {source} {", ".join(missing)}; give {listed}')
    config = NetworkConfig(**{name: int(flags[name]) for name in NetworkConfig.__annotations__})
    try:
        models.check_sizes(*config.size)
    except ValueError as error:
        raise DataError(f'--fineSizeH {config.fineSizeH} --fineSizeW {config.fineSizeW}: {error}') from None
    return config


def parameter_problem(saved, needed):
    """What is wrong with a saved parameter (array or None) for the graph's (Variable or None)."""
    if saved is None:
        return 'is missing, and the generator needs it'
    if needed is None:
        return 'is not used by the generator'
    if saved.shape != needed.shape:
        return f'is {saved.shape}, the generator needs {needed.shape}'
    if not np.isfinite(saved).all():
        return 'holds NaN or infinite values'
    return None


class Translator:
    """One direction's generator pass graph for one image and K = config.ins_per slots, run
    once per pass of sequential translation."""

    def __init__(self, params_file, direction, config, alongside=0):
        """alongside: the generators still to be built beside this one, whose memory is
        checked with its own."""
        self.config, self.size = config, config.size
        scope = DIRECTIONS[direction]
        saved = generator_parameters(params_file, direction)
        # Checked before the graph is built: a wrong --ngf could ask for any amount of memory.
        made = {
            name: size
            for name, size in file_sizes(saved).items()
            if size is not None and size != getattr(config, name)
        }
        if made:
            raise DataError(
                f'{params_file} was made with {flags_text(made)}, not '
                f'{flags_text({name: getattr(config, name) for name in made})}'
            )
        check_translation_memory(config, 1 + alongside)
        self.image = nn.Variable((1, 3) + self.size)
        self.masks = nn.Variable((1, config.ins_per) + self.size)
        with nn.parameter_scope(scope), nn.no_grad():  # keeps no buffer for a backward
            self.image_out, self.masks_out, _ = models.generator_pass(
                self.image, self.masks, config.ngf, config.n_blocks
            )
            needed = {name: p for name, p in nn.get_parameters(grad_only=False).items()}
        for name in sorted(set(needed) | set(saved)):
            problem = parameter_problem(saved.get(name), needed.get(name))
            if problem:
                raise DataError(f'{params_file}: {scope}/{name} {problem}')
            needed[name].d = saved[name]
        self.image_out.persistent = self.masks_out.persistent = True

    def outputs(self):
        return self.image_out, self.masks_out

    def __call__(self, image, masks):
        """(3, H, W) image and (N, H, W) masks in [-1, 1] at the network size, in slot order ->
        the translated image and masks."""
        per_pass = self.config.ins_per
        passes = models.pass_slices(len(masks), per_pass)
        slots = np.full((passes[-1].stop,) + self.size, -1, np.float32)
        slots[: len(masks)] = masks
        translated = np.empty_like(slots)
        for pass_slots in passes:
            self.image.d, self.masks.d = image[None], slots[None, pass_slots]
            nn.forward_all([self.image_out, self.masks_out], clear_buffer=True)
            image, translated[pass_slots] = self.image_out.d[0].copy(), self.masks_out.d[0]
        return image, translated[: len(masks)]


def check_translation_memory(config, generators=1):
    """Refuse, before anything is built, a network size this machine has no memory for."""
    check_memory(
        models.translation_memory(config.size, config.ins_per, config.ngf, config.n_blocks, generators),
        f'{generators} generator{"s" * (generators > 1)} of --ngf {config.ngf} '
        f'--n-blocks {config.n_blocks} at {config.fineSizeH}x{config.fineSizeW}',
    )


def load_translators(model, directions, given=None, accelerate=None, ins_cap=None):
    """(parameter file, NetworkConfig, {direction: Translator}) of a model in any form; with
    `ins_cap`, the slots of a pass are capped at that many instances."""
    params_file = find_parameters(model)
    config = network_config(params_file, given)
    if ins_cap:
        config.ins_per = models.slots_per_pass(config.ins_per, ins_cap)
    nn.clear_parameters()
    translators = {}
    for i, direction in enumerate(directions):
        translators[direction] = Translator(params_file, direction, config, alongside=len(directions) - 1 - i)
        nn.clear_parameters()
    if accelerate:
        for translator in translators.values():
            accelerate(*translator.outputs())
    return params_file, config, translators
