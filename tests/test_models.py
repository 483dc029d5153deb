"""Shapes and the set and batch properties the paper's networks must have."""

import json
import os
from collections import Counter

import nnabla as nn
import nnabla.functions as F
import numpy as np
import pytest

import models
from cpu_engine import functions as cpu_functions

NGF, BLOCKS, SIZE = 8, 2, 32
# Outputs computed with other batch or slot counts differ in float32 rounding only.
ATOL = 1e-4


def random_inputs(batch, slots, empty=(), seed=0):
    """Images in [-1, 1] and blob-shaped masks in {-1, 1}; (sample, slot) pairs in `empty` are -1."""
    rng = np.random.RandomState(seed)
    images = rng.uniform(-1, 1, (batch, 3, SIZE, SIZE)).astype(np.float32)
    masks = -np.ones((batch, slots, SIZE, SIZE), dtype=np.float32)
    for b in range(batch):
        for n in range(slots):
            if (b, n) not in empty:
                top, left = rng.randint(0, SIZE - 8, size=2)
                height, width = rng.randint(4, 16, size=2)
                masks[b, n, top : top + height, left : left + width] = 1
    return images, masks


class Networks:
    """Builds graphs for any input shape with one set of parameters, and evaluates them from
    the same parameter values every time (spectral norm updates its vector on every forward)."""

    def __init__(self):
        self.snapshots = {}

    def run(self, network, images, masks):
        image_var, mask_var = nn.Variable(images.shape), nn.Variable(masks.shape)
        with nn.parameter_scope(network):
            if network == 'generator':
                outputs = models.generator(image_var, mask_var, ngf=NGF, n_blocks=BLOCKS)
            else:
                outputs = (models.discriminator(image_var, mask_var, ndf=NGF),)
            parameters = nn.get_parameters(grad_only=False)
        snapshot = self.snapshots.setdefault(network, {k: v.d.copy() for k, v in parameters.items()})
        for key, value in snapshot.items():
            parameters[key].d = value
        image_var.d, mask_var.d = images, masks
        nn.forward_all(outputs)
        return [o.d.copy() for o in outputs]


@pytest.fixture
def networks():
    np.random.seed(0)
    return Networks()


def test_shapes_and_transposed_convolution_weights(networks):
    images, masks = random_inputs(2, 3)
    image_out, masks_out = networks.run('generator', images, masks)
    assert image_out.shape == images.shape and masks_out.shape == masks.shape
    assert np.abs(image_out).max() <= 1 and np.abs(masks_out).max() <= 1
    (scores,) = networks.run('discriminator', images, masks)
    assert scores.shape == (2, 1, 2, 2)
    parameters = nn.get_parameters(grad_only=False)
    # The paper's decoders upsample with 3x3 transposed convolutions.
    assert parameters['generator/image_decoder/up0/deconv/W'].shape == (8 * NGF, 4 * NGF, 3, 3)
    assert parameters['generator/mask_decoder/up0/deconv/W'].shape == (12 * NGF, 6 * NGF, 3, 3)
    assert parameters['discriminator/classifier/conv0/conv/W'].shape == (16 * NGF, 8 * NGF, 4, 4)


def test_generator_is_permutation_equivariant(networks):
    images, masks = random_inputs(2, 3, empty={(1, 0)})
    order = [2, 0, 1]
    image_out, masks_out = networks.run('generator', images, masks)
    permuted_image_out, permuted_masks_out = networks.run('generator', images, masks[:, order])
    np.testing.assert_allclose(permuted_image_out, image_out, atol=ATOL)
    np.testing.assert_allclose(permuted_masks_out, masks_out[:, order], atol=ATOL)


def test_discriminator_is_permutation_invariant(networks):
    images, masks = random_inputs(2, 3, empty={(0, 1)})
    (scores,) = networks.run('discriminator', images, masks)
    (permuted_scores,) = networks.run('discriminator', images, masks[:, [1, 2, 0]])
    np.testing.assert_allclose(permuted_scores, scores, atol=ATOL)


@pytest.mark.parametrize('network', ['generator', 'discriminator'])
def test_samples_of_a_batch_do_not_mix(networks, network):
    images, masks = random_inputs(3, 2, empty={(1, 1), (2, 0), (2, 1)})
    batch_outputs = networks.run(network, images, masks)
    for b in range(3):
        alone = networks.run(network, images[b : b + 1], masks[b : b + 1])
        for together, single in zip(batch_outputs, alone):
            np.testing.assert_allclose(together[b : b + 1], single, atol=ATOL)


def test_empty_slots_pass_through_and_contribute_nothing(networks):
    images, masks = random_inputs(2, 2, empty={(0, 1), (1, 1)})
    image_out, masks_out = networks.run('generator', images, masks)
    assert np.all(masks_out[:, 1] == -1)
    # An extra empty slot leaves every output as it was.
    padded = np.concatenate([masks, -np.ones_like(masks[:, :1])], axis=1)
    padded_image_out, padded_masks_out = networks.run('generator', images, padded)
    np.testing.assert_allclose(padded_image_out, image_out, atol=ATOL)
    np.testing.assert_allclose(padded_masks_out[:, :2], masks_out, atol=ATOL)
    assert np.all(padded_masks_out[:, 2] == -1)
    (scores,) = networks.run('discriminator', images, masks)
    (padded_scores,) = networks.run('discriminator', images, padded)
    np.testing.assert_allclose(padded_scores, scores, atol=ATOL)


def test_instances_change_the_translation(networks):
    """The mask branch must reach the image decoder: a different instance, a different image."""
    images, masks = random_inputs(1, 1, seed=1)
    image_out, _ = networks.run('generator', images, masks)
    other_image_out, _ = networks.run('generator', images, -masks)
    assert np.abs(other_image_out - image_out).max() > 1e-4


def test_parameter_names_and_shapes_are_those_checkpoints_have():
    """Names and shapes of a tiny build as recorded in parameter_shapes.json, written before
    models.py used PF's public API: parameters.h5 files load by name, so every recorded name
    must map (current_parameter_name, applied at load time) onto one the networks build."""
    with open(os.path.join(os.path.dirname(__file__), 'parameter_shapes.json')) as f:
        recorded = json.load(f)
    image, masks = nn.Variable((1, 3, 32, 24)), nn.Variable((1, 2, 32, 24))
    with nn.parameter_scope('generator_x2y'):
        models.generator(image, masks, ngf=4, n_blocks=1)
    with nn.parameter_scope('discriminator_y'):
        models.discriminator(image, masks, ndf=4, n_layers=3)
    built = {name: list(parameter.shape) for name, parameter in nn.get_parameters(grad_only=False).items()}
    assert built == {models.current_parameter_name(name): shape for name, shape in recorded.items()}
    assert len(built) == len(recorded)


def function_counts(variable):
    functions = []
    variable.visit(functions.append)
    return Counter(function.info.type_name for function in functions)


def test_cpu_functions_give_the_same_networks():
    """--cpu-conv blas changes how the convolutions and normalisations run, not what they
    compute: the graph cpu_functions.accelerate makes of the built one gives the same outputs,
    spectral-norm vectors and gradients."""
    images, masks = random_inputs(2, 2, empty={(1, 1)})
    nn.seed(0)
    image_var, mask_var = nn.Variable.from_numpy_array(images), nn.Variable.from_numpy_array(masks)
    with nn.parameter_scope('generator'):
        image_out, masks_out = models.generator(image_var, mask_var, NGF, BLOCKS)
    with nn.parameter_scope('discriminator'):
        scores = models.discriminator(image_out, masks_out, ndf=NGF)
    loss = F.mean(scores) + F.mean(image_out)
    outputs = [image_out, masks_out, scores]
    for output in outputs:  # what accelerate keeps for the caller, besides `loss`
        output.persistent = True
    parameters = nn.get_parameters(grad_only=False)
    start = {name: parameter.d.copy() for name, parameter in parameters.items()}

    def outputs_and_gradients():
        for name, parameter in parameters.items():
            parameter.d = start[name]  # spectral norm moves u on every forward
            parameter.grad.zero()
        for output in outputs:
            output.data.fill(np.nan)  # so that a variable no longer computed shows
        loss.forward()
        loss.backward()
        return (
            [output.d.copy() for output in outputs]
            + [parameters[name].d.copy() for name in sorted(parameters)]
            + [parameters[name].g.copy() for name in sorted(parameters)]
        )

    nnabla_results = outputs_and_gradients()
    nnabla_functions = function_counts(loss)
    cpu_functions.accelerate(loss)
    blas_functions = function_counts(loss)
    # Every convolution, normalisation and reflection padding moved.
    assert [
        blas_functions[k]
        for k in ['BlasConvolution', 'BlasDeconvolution', 'CpuSpectralNorm', 'CpuInstanceNormalization']
    ] == [nnabla_functions[k] for k in ['Convolution', 'Deconvolution', 'SpectralNorm', 'Div2']]
    assert not {'Convolution', 'Deconvolution', 'SpectralNorm', 'Pad', 'Div2'} & set(blas_functions)
    for nnabla_value, blas_value in zip(nnabla_results, outputs_and_gradients()):
        scale = max(1.0, float(np.abs(nnabla_value).max()))
        np.testing.assert_allclose(blas_value, nnabla_value, rtol=1e-3, atol=1e-4 * scale)


def test_the_accelerated_graph_frees_what_a_directly_built_one_frees():
    """The CPU instance norm's gradient needs only its input, so a forward that clears what
    no gradient needs frees the output of the residual blocks' second norm, which only an
    addition reads. nnabla keeps it when the graph is patched with rewire_on, or while a
    left-over function of the old graph still reads it."""
    image, masks = random_inputs(1, 1)
    with nn.parameter_scope('generator'):
        image_out, _ = models.generator(
            nn.Variable.from_numpy_array(image), nn.Variable.from_numpy_array(masks), NGF, BLOCKS
        )
    cpu_functions.accelerate(image_out)
    image_out.forward(clear_no_need_grad=True)
    functions = []
    image_out.visit(functions.append)
    readers = {}
    for function in functions:
        for variable in function.inputs:
            readers.setdefault(variable, []).append(function.info.type_name)
    normalised = [
        function.outputs[0] for function in functions if function.info.type_name == 'CpuInstanceNormalization'
    ]
    assert len(normalised) == 2 * (3 + 2 * BLOCKS) + 2  # both encoders, the image decoder
    added = [y for y in normalised if readers[y] == ['Add2']]
    assert len(added) == 2 * BLOCKS
    assert all(y.data.clear_called for y in added)


def test_a_graph_is_accelerated_once():
    """A second call would make nnabla set up its CPU functions again, which crashes it."""
    image, masks = random_inputs(1, 1)
    with nn.parameter_scope('generator'):
        image_out, _ = models.generator(
            nn.Variable.from_numpy_array(image), nn.Variable.from_numpy_array(masks), NGF, BLOCKS
        )
    cpu_functions.accelerate(image_out)
    with pytest.raises(ValueError, match='accelerate each graph once'):
        cpu_functions.accelerate(image_out)


def pretrained_inputs(size=(64, 44)):
    """The seeded input tests/pretrained_outputs.npz was recorded on: a noise image and two
    slots, a rectangle and an empty one (all -1)."""
    rng = np.random.RandomState(0)
    image = rng.uniform(-1, 1, (3,) + size).astype(np.float32)
    masks = np.full((2,) + size, -1, np.float32)
    masks[0, 16:48, 10:34] = 1
    return image, masks


@pytest.mark.parametrize('direction', ['AtoB', 'BtoA'])
def test_pretrained_generator_gives_the_recorded_outputs(direction):
    """tests/pretrained_outputs.npz holds what pretrained/jeans2skirt_64x44 gave on
    pretrained_inputs() (K = 2, plain NNabla on the CPU) when instance_exists was still
    F.greater_scalar(peak, -1) and the generator reshaped `exists` twice: changing the graph
    for the ONNX converter changed no output (bit-identical on the machine that recorded it;
    the tolerance is for other CPUs' float rounding)."""
    from translator import Translator, find_parameters, network_config

    params = find_parameters(os.path.join(os.path.dirname(__file__), '..', 'pretrained', 'jeans2skirt_64x44'))
    config = network_config(params)
    config.ins_per = 2
    image_out, masks_out = Translator(params, direction, config)(*pretrained_inputs())
    with np.load(os.path.join(os.path.dirname(__file__), 'pretrained_outputs.npz')) as recorded:
        np.testing.assert_allclose(image_out, recorded[f'{direction}_image'], rtol=0, atol=1e-6)
        np.testing.assert_allclose(masks_out, recorded[f'{direction}_masks'], rtol=0, atol=1e-6)
    assert (masks_out[1] == -1).all()  # the empty slot comes out unchanged


def greater_scalar_exists(masks):
    """instance_exists as it was until the ONNX export: F.greater_scalar(peak, -1)."""
    return F.greater_scalar(F.max(masks, axis=(2, 3)), -1.0)


def exists_bits(function, masks):
    exists = function(nn.Variable.from_numpy_array(masks))
    exists.forward()
    return exists.d.view(np.uint32).copy()


def test_instance_exists_is_greater_scalar_bit_for_bit():
    """The converter-friendly form gives the same float32 bits as F.greater_scalar(peak, -1):
    on a million peaks (1x1 masks) of every kind, from NaN and +-inf through the floats next
    to -1 to denormals, and on masks with empty slots and NaN or infinite pixels."""
    rng = np.random.RandomState(0)
    special = np.array(
        [
            np.nan,
            -np.nan,
            np.inf,
            -np.inf,
            -1,
            0,
            -0.0,
            1,
            -2,
            np.nextafter(np.float32(-1), np.float32(0)),
            np.nextafter(np.float32(-1), np.float32(-2)),
            np.finfo(np.float32).max,
            -np.finfo(np.float32).max,
            np.finfo(np.float32).tiny,
            -np.finfo(np.float32).tiny,
            1e-45,
            -1e-45,
        ],
        np.float32,
    )
    peaks = np.concatenate(
        [
            special,
            rng.choice(special, 200_000),
            -1 + rng.uniform(-1e-6, 1e-6, 200_000).astype(np.float32),
            rng.uniform(-2, 2, 200_000).astype(np.float32),
            (rng.standard_normal(200_000) * 10.0 ** rng.randint(-40, 38, 200_000)).astype(np.float32),
            rng.randint(0, 2**32, 200_000 - len(special), dtype=np.uint64)
            .astype(np.uint32)
            .view(np.float32),  # any bit pattern, NaN payloads included
        ]
    )
    assert len(peaks) == 1_000_000
    peaks = peaks.reshape(1000, 1000, 1, 1)
    assert np.isnan(peaks).any() and np.isposinf(peaks).any() and np.isneginf(peaks).any()
    new, old = exists_bits(models.instance_exists, peaks), exists_bits(greater_scalar_exists, peaks)
    assert np.array_equal(new, old)
    assert set(np.unique(new).tolist()) == {0, np.float32(1).view(np.uint32)}

    _, masks = random_inputs(4, 3, empty={(0, 1), (2, 0), (3, 0), (3, 1), (3, 2)})
    masks[1, 0, 3, 4] = np.nan
    masks[1, 2, 5, 6] = np.inf
    masks[2, 1] = -np.inf
    masks[2, 2] = -1
    masks[2, 2, 7, 7] = np.nextafter(np.float32(-1), np.float32(0))
    new, old = exists_bits(models.instance_exists, masks), exists_bits(greater_scalar_exists, masks)
    assert np.array_equal(new, old)
    assert (new.view(np.float32)[3] == 0).all() and new.view(np.float32)[2, 2] == 1


def test_no_variable_of_the_generator_is_reshaped_twice():
    """The ONNX converter names each Reshape's shape constant `<input>_shape`: two Reshapes of
    one variable would make two constants of one name."""
    image, masks = random_inputs(1, 2)
    with nn.parameter_scope('generator'):
        image_out, masks_out, active = models.generator_pass(
            nn.Variable(image.shape), nn.Variable(masks.shape), ngf=4, n_blocks=1
        )
    functions = []
    F.sink(image_out, masks_out, active).visit(functions.append)
    reshaped = Counter(function.inputs[0] for function in functions if function.info.type_name == 'Reshape')
    assert reshaped and max(reshaped.values()) == 1
    assert 'GreaterScalar' not in {function.info.type_name for function in functions}
