"""A trained generator as a file other programs run: an NNabla .nnp (nnabla.utils.nnp_graph)
and an ONNX model (onnxruntime and others), each checked against NNabla. Used by export.py.

The exported graph is ONE pass of sequential translation (paper section 2.3), the graph that
Translator runs per pass: an image (1, 3, H, W) and K instance masks (1, K, H, W) in, the
translated image and K translated masks out, named `image`, `masks`, `translated_image` and
`translated_masks`. NCHW, RGB, values in -1..1; a mask is 1 inside its instance and -1
outside, and an empty slot is -1 everywhere (it comes out unchanged, and a pass whose slots
are all empty leaves the image unchanged). More instances than K: run the passes in turn, each
on the previous pass's translated image, the slots padded with all -1 masks (docs/deploy.md).

The ONNX model is made by nnabla-converter's Python API (OnnxExporter on the protobuf that
nnabla.utils.save writes into the .nnp); its command line would import TensorFlow, this does
not, and nothing on either path unpickles a file.
"""

import io
import os
import warnings
import zipfile
from contextlib import contextmanager

import nnabla as nn
import numpy as np
from nnabla.utils.nnp_graph import NnpLoader
from nnabla.utils.save import create_proto, save

from data import DataError, largest_first, list_images, load_resized, mask_paths
from runtime import RunError
from runtime.files import replaced_atomically
from translator import Translator

FORMATS = ('nnp', 'onnx')
# The opsets at which nnabla-converter 1.39 exports this generator and onnxruntime agrees
# with NNabla; it maps others silently onto 7 or 6, which have no Sign.
OPSETS = (9, 10, 11, 13)
INPUTS = ('image', 'masks')
OUTPUTS = ('translated_image', 'translated_masks')
# The largest absolute difference from the NNabla graph a file may show on a real input.
LIMITS = {'nnp': 1e-5, 'onnx': 1e-4}


class CheckFailed(RunError):
    """An exported file disagrees with NNabla beyond its limit."""


def network_name(direction):
    return f'instagan_generator_{direction}'


def file_name(direction, config, fmt):
    """generator_AtoB_64x44_k1.onnx: direction, network size and slots per pass."""
    return f'generator_{direction}_{config.fineSizeH}x{config.fineSizeW}_k{config.ins_per}.{fmt}'


def metadata(direction, config):
    """{key: text} written into each file: what the graph takes and gives."""
    height, width, slots = config.fineSizeH, config.fineSizeW, config.ins_per
    return {
        'direction': direction,
        'pass': 'one pass of sequential translation; more instances than slots: chain passes, '
        'each on the previous translated_image, slots padded with all -1 masks',
        'layout': 'NCHW',
        'value_range': '-1..1',
        'image': f'RGB (1, 3, {height}, {width})',
        'masks': f'(1, {slots}, {height}, {width}), 1 inside an instance, -1 outside',
        'empty_slot': 'all -1 (comes out unchanged)',
        'instance_slots': str(slots),
        'network_size': f'{height}x{width}',
        'inputs': ' '.join(INPUTS),
        'outputs': ' '.join(OUTPUTS),
    }


def description(direction, config):
    """One line saying what the file is."""
    height, width, slots = config.fineSizeH, config.fineSizeW, config.ins_per
    return (
        f'InstaGAN generator {direction}, one pass of sequential translation: '
        f'image (1, 3, {height}, {width}) and masks (1, {slots}, {height}, {width}) in, '
        f'translated_image and translated_masks of the same shapes out; NCHW, RGB, '
        f'values -1..1, a mask 1 inside its instance and -1 outside, an empty slot all -1'
    )


@contextmanager
def own_parameters():
    """NNabla's global parameter store emptied before and after: building a Translator or
    loading an .nnp fills it."""
    nn.clear_parameters()
    try:
        yield
    finally:
        nn.clear_parameters()


def contents(translator, direction, config):
    """What nnabla.utils.save writes: the pass graph under its four names. The protobuf has no
    free text field; the network's name gives the direction and the executor's name is the
    description."""
    name = network_name(direction)
    return {
        'networks': [
            {
                'name': name,
                'batch_size': 1,
                'outputs': dict(zip(OUTPUTS, translator.outputs())),
                'names': dict(zip(INPUTS, (translator.image, translator.masks))),
            }
        ],
        'executors': [
            {
                'name': description(direction, config),
                'network': name,
                'data': list(INPUTS),
                'output': list(OUTPUTS),
            }
        ],
    }


def nnp_bytes(translator, direction, config):
    """The .nnp of a built Translator (its parameters still in the global store). A fixed
    batch size of 1: nnabla's variable batch size does not load back."""
    buffer = io.BytesIO()
    save(buffer, contents(translator, direction, config), variable_batch_size=False, extension='.nnp')
    with zipfile.ZipFile(buffer, 'a') as archive:  # `unzip -z` shows it
        archive.comment = '\n'.join(
            [description(direction, config)] + [f'{k}: {v}' for k, v in metadata(direction, config).items()]
        ).encode('ascii')
    return buffer.getvalue()


def onnx_bytes(translator, direction, config, opset=11):
    """The ONNX model of a built Translator, at `opset` (one of OPSETS)."""
    import onnx
    from nnabla.utils.converter.onnx import OnnxExporter

    if opset not in OPSETS:
        raise ValueError(f'opset {opset} is not one of {OPSETS}')

    class Nnp:  # what OnnxExporter reads of NnpImporter's result
        protobuf = create_proto(
            contents(translator, direction, config), include_params=True, variable_batch_size=False
        )

    with warnings.catch_warnings():  # its numpy calls are deprecated (tostring)
        warnings.simplefilter('ignore', DeprecationWarning)
        model = OnnxExporter(Nnp, 1, -1, str(opset)).export_model_proto()
    model.doc_string = description(direction, config)
    for key, value in metadata(direction, config).items():
        model.metadata_props.add(key=key, value=value)
    shapes = metadata(direction, config)
    docs = {
        'image': f'{shapes["image"]}, NCHW, -1..1',
        'masks': f'{shapes["masks"]}, NCHW; an empty slot is all -1',
        'translated_image': f'{shapes["image"]}, NCHW, -1..1',
        'translated_masks': f'{shapes["masks"]}, NCHW',
    }
    for value_info in list(model.graph.input) + list(model.graph.output):
        value_info.doc_string = docs.get(value_info.name, '')
    onnx.checker.check_model(model)
    return model.SerializeToString()


class NnpRunner:
    """An exported .nnp run by nnabla.utils.nnp_graph: (3, H, W) image and (K, H, W) masks ->
    the translated image and masks."""

    def __init__(self, path):
        with own_parameters():
            loader = NnpLoader(path)
            network = loader.get_network(loader.get_network_names()[0], batch_size=1)
        self.inputs = [network.inputs[name] for name in INPUTS]
        self.outputs = [network.outputs[name] for name in OUTPUTS]

    def __call__(self, image, masks):
        for variable, value in zip(self.inputs, (image, masks)):
            variable.d = value[None]
        nn.forward_all(self.outputs, clear_buffer=True)
        return tuple(output.d[0].copy() for output in self.outputs)


class OnnxRunner:
    """An exported ONNX model run by onnxruntime on the CPU, called as NnpRunner."""

    def __init__(self, path):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        # Its threads would otherwise spin on after each run, taking the cores from whatever
        # runs next in this process (NNabla, when export.py --time takes turns).
        options.add_session_config_entry('session.intra_op.allow_spinning', '0')
        self.session = onnxruntime.InferenceSession(path, options, providers=['CPUExecutionProvider'])

    def __call__(self, image, masks):
        feed = {'image': image[None].astype(np.float32), 'masks': masks[None].astype(np.float32)}
        return tuple(output[0] for output in self.session.run(list(OUTPUTS), feed))


RUNNERS = {'nnp': NnpRunner, 'onnx': OnnxRunner}


def reference_outputs(params_file, direction, config, inputs):
    """[(image, masks)] the NNabla graph (plain functions) gives for each one-pass input."""
    with own_parameters():
        translator = Translator(params_file, direction, config)
        return [translator(image, masks) for image, masks in inputs]


def largest_difference(runner, inputs, references):
    """The largest absolute difference between what `runner` gives and the references (NaN
    if either gives a NaN)."""
    largest = 0.0
    for (image, masks), expected in zip(inputs, references):
        for got, want in zip(runner(image, masks), expected):
            if got.shape != want.shape:
                raise CheckFailed(f'gives {got.shape}, NNabla {want.shape}')
            difference = float(np.abs(got - want).max())
            if np.isnan(difference):
                return difference
            largest = max(largest, difference)
    return largest


def one_pass_input(image_path, masks, config):
    """A photo and its mask files resized to the network size as translate.py does, the masks
    largest first in K = config.ins_per slots (further ones left out, missing ones all -1)."""
    image, mask_values, _ = load_resized(image_path, masks, config.size)
    slots = np.full((config.ins_per,) + config.size, -1, np.float32)
    chosen = mask_values[largest_first(mask_values)][: config.ins_per]
    slots[: len(chosen)] = chosen
    return image, slots


def check_inputs(config, image=None, masks=None, folder=None, every=False):
    """[(image, masks)] to check on: `image` with `masks` (default: its masks in the dataset
    layout), or the first image of `folder` with its masks (every image with `every`)."""
    if image is not None:
        for path in [image] + list(masks or []):
            if not os.path.isfile(path):
                raise DataError(f'{path}: file not found')
        pairs = [(image, list(masks) if masks else mask_paths(image))]
    else:
        images = list_images(folder)
        pairs = [(str(path), mask_paths(path)) for path in (images if every else images[:1])]
    for path, found in pairs:
        if not found:
            raise DataError(f'{path}: no instance masks given or found beside it (DIR_seg/NAME_0.png, ...)')
    return [one_pass_input(path, found, config) for path, found in pairs]


def export_bytes(params_file, direction, config, formats, opset=11):
    """{format: the file's bytes} of one direction's generator."""
    with own_parameters():  # nnabla.utils.save reads the parameters from the global store
        translator = Translator(params_file, direction, config)
        return {
            fmt: nnp_bytes(translator, direction, config)
            if fmt == 'nnp'
            else onnx_bytes(translator, direction, config, opset)
            for fmt in formats
        }


def write_checked(path, data, fmt, inputs, references):
    """Write an exported file to `path`, then run the written file on `inputs` against the
    NNabla `references`; returns the largest difference. A file over its limit (LIMITS) is
    removed again, and raises CheckFailed."""
    with replaced_atomically(path) as partial:  # keeps the extension, which NnpLoader reads
        with open(partial, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            difference = largest_difference(RUNNERS[fmt](partial), inputs, references)
        except CheckFailed as error:
            raise CheckFailed(f'{path} {error}; not written') from None
        except Exception as error:  # the runtimes report a file they cannot run many ways
            reason = str(error).strip().split('\n')[0]
            raise CheckFailed(
                f'{path}: {fmt} could not run it ({type(error).__name__}: {reason}); not written'
            ) from None
        if not difference <= LIMITS[fmt]:
            raise CheckFailed(
                f'{path} differs from NNabla by up to {difference:.3g} (limit '
                f'{LIMITS[fmt]:g} for {fmt}); not written'
            )
    return difference
