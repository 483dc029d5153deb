"""export.py and exporting.py: the exported .nnp and ONNX files compute what the training graph
computes, say what they are, and bad input is refused in one line; the onnxruntime example
translates as Translator does. onnx and onnxruntime are dev requirements: nothing here skips."""

import ast
import json
import os
import pickle
import signal
import subprocess
import sys
import zipfile

import nnabla as nn
import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from nnabla.utils import nnabla_pb2
from PIL import Image
from test_data import save_example
from test_translate import FINE, N_BLOCKS, NGF, catches_sigterm, noise, rectangle, save_generators, wait_for

import export
import exporting
import models
from conftest import ROOT
from data import largest_first, load_resized
from translator import DIRECTIONS, Translator, network_config

# Two network sizes (the file's own and another), one and two slots per pass.
SIZES = [FINE, (16, 40)]
SLOTS = [1, 2]


@pytest.fixture(autouse=True)
def restore_context():
    """export.main sets the default context for the whole process."""
    context = nn.get_current_context()
    yield
    nn.set_default_context(context)


@pytest.fixture(autouse=True)
def no_unpickled_files(monkeypatch):
    """Nothing on the export path unpickles a file (nnabla-converter's command-line helpers
    would load its functions.pkl). pickle.loads stays: NNabla itself passes each function's
    description from C++ to Python through it, in memory, whenever a graph is walked."""

    def refuse(*args, **kwargs):
        raise AssertionError('a file was unpickled')

    monkeypatch.setattr(pickle, 'load', refuse)
    monkeypatch.setattr(pickle, 'Unpickler', refuse)


@pytest.fixture(scope='module')
def model(tmp_path_factory):
    return save_generators(tmp_path_factory.mktemp('models') / 'checkpoint_000000001')


def config_of(model, size, slots):
    return network_config(str(model), {'fineSizeH': size[0], 'fineSizeW': size[1], 'ins_per': slots})


def one_pass_inputs(size, slots, seed=0):
    """[(image, masks)]: every slot an instance, then the last slot empty (with one slot: a
    pass with nothing to translate, which must leave the image as it is)."""
    rng = np.random.RandomState(seed)
    image = rng.uniform(-1, 1, (3,) + size).astype(np.float32)
    masks = np.full((slots,) + size, -1, np.float32)
    for slot in range(slots):
        top, left = rng.randint(0, size[0] // 2), rng.randint(0, size[1] // 2)
        masks[slot, top : top + size[0] // 2, left : left + size[1] // 3] = 1
        masks[slot, top, left] = 0.3  # a soft edge pixel, as resized masks have
    emptied = masks.copy()
    emptied[-1] = -1
    return [(image, masks), (image, emptied)]


def training_graph_outputs(params, direction, size, slots, inputs):
    """What models.generator_pass, as train.py builds it, gives for each one-pass input."""
    nn.clear_parameters()
    nn.load_parameters(str(params))
    image, masks = nn.Variable((1, 3) + size), nn.Variable((1, slots) + size)
    with nn.parameter_scope(DIRECTIONS[direction]):
        image_out, masks_out, _ = models.generator_pass(image, masks, NGF, N_BLOCKS)
    outputs = []
    for image_value, mask_values in inputs:
        image.d, masks.d = image_value[None], mask_values[None]
        nn.forward_all([image_out, masks_out])
        outputs.append((image_out.d[0].copy(), masks_out.d[0].copy()))
    nn.clear_parameters()
    return outputs


def exported(model, direction, config, tmp_path, opset=11):
    """{format: path} of both files, written without a check."""
    paths = {}
    for fmt, data in exporting.export_bytes(str(model), direction, config, exporting.FORMATS, opset).items():
        paths[fmt] = tmp_path / exporting.file_name(direction, config, fmt)
        paths[fmt].write_bytes(data)
    return paths


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('slots', SLOTS)
def test_exported_files_compute_the_training_graph(size, slots, model, tmp_path):
    config = config_of(model, size, slots)
    inputs = one_pass_inputs(size, slots)
    for direction in DIRECTIONS:
        expected = training_graph_outputs(model, direction, size, slots, inputs)
        assert not np.array_equal(expected[0][0], inputs[0][0])  # the pass changes the image
        if slots == 1:  # nothing to translate: the image passes through
            np.testing.assert_array_equal(expected[1][0], inputs[1][0])
        paths = exported(model, direction, config, tmp_path)
        nnp = exporting.NnpRunner(str(paths['nnp']))
        onnx_model = exporting.OnnxRunner(str(paths['onnx']))
        for (image, masks), (image_out, masks_out) in zip(inputs, expected):
            for runner, tolerance in [(nnp, 1e-6), (onnx_model, 1e-4)]:
                got_image, got_masks = runner(image, masks)
                assert got_image.shape == image_out.shape and got_masks.shape == masks_out.shape
                np.testing.assert_allclose(got_image, image_out, rtol=0, atol=tolerance)
                np.testing.assert_allclose(got_masks, masks_out, rtol=0, atol=tolerance)
            assert (got_masks[masks.max(axis=(1, 2)) == -1] == -1).all()  # empty slots
    assert 'tensorflow' not in sys.modules


@pytest.mark.parametrize('opset', exporting.OPSETS)
def test_every_offered_opset_converts_and_agrees(opset, model, tmp_path):
    config = config_of(model, FINE, 2)
    inputs = one_pass_inputs(FINE, 2, seed=opset)
    expected = training_graph_outputs(model, 'BtoA', FINE, 2, inputs)
    path = exported(model, 'BtoA', config, tmp_path, opset)['onnx']
    assert onnx.load(str(path)).opset_import[0].version == opset
    runner = exporting.OnnxRunner(str(path))
    for (image, masks), want in zip(inputs, expected):
        for got, wanted in zip(runner(image, masks), want):
            np.testing.assert_allclose(got, wanted, rtol=0, atol=1e-4)


def test_files_say_what_they_hold(model, tmp_path):
    config = config_of(model, (16, 40), 2)
    paths = exported(model, 'BtoA', config, tmp_path)
    said = exporting.description('BtoA', config)
    assert 'BtoA' in said and 'NCHW' in said and '-1..1' in said and 'all -1' in said

    onnx_model = onnx.load(str(paths['onnx']))
    assert onnx_model.doc_string == said
    properties = {p.key: p.value for p in onnx_model.metadata_props}
    assert properties['direction'] == 'BtoA'
    assert properties['layout'] == 'NCHW'
    assert properties['value_range'] == '-1..1'
    assert properties['empty_slot'].startswith('all -1')
    assert properties['instance_slots'] == '2'
    shapes = {
        value.name: [d.dim_value for d in value.type.tensor_type.shape.dim]
        for value in list(onnx_model.graph.input) + list(onnx_model.graph.output)
    }
    assert shapes == {
        'image': [1, 3, 16, 40],
        'masks': [1, 2, 16, 40],
        'translated_image': [1, 3, 16, 40],
        'translated_masks': [1, 2, 16, 40],
    }
    assert [value.name for value in onnx_model.graph.input] == ['image', 'masks']
    assert all(value.doc_string for value in onnx_model.graph.input)

    with zipfile.ZipFile(paths['nnp']) as archive:
        proto = nnabla_pb2.NNablaProtoBuf()
        text_format.Merge(archive.read('network.nntxt').decode(), proto)
        comment = archive.comment.decode()
    assert [network.name for network in proto.network] == ['instagan_generator_BtoA']
    (executor,) = proto.executor
    assert executor.name == said
    assert [v.variable_name for v in executor.data_variable] == ['image', 'masks']
    assert [v.variable_name for v in executor.output_variable] == ['translated_image', 'translated_masks']
    assert comment.startswith(said) and 'layout: NCHW' in comment


# export.py, the command line.


def exit_of(*argv):
    """export.main's SystemExit code (None: it returned)."""
    try:
        export.main([str(a) for a in argv])
    except SystemExit as exit:
        return exit.code
    return None


def one_line_error(code, capsys):
    """The one line a non-zero exit printed: argparse's error or export.py's message."""
    assert code not in (0, None)
    stderr = capsys.readouterr().err
    assert 'Traceback' not in stderr
    if code == 2:
        assert stderr.startswith('usage: export.py')
        return stderr.strip().splitlines()[-1]
    assert isinstance(code, str) and '\n' not in code
    return code


def test_export_writes_both_directions_and_formats_checked_on_a_real_photo(model, tmp_path, capsys):
    """By default the check input is the first photo of datasets/ccp_sample (trainA for AtoB,
    trainB for BtoA) with its masks."""
    out = tmp_path / 'out'
    assert exit_of('--params', model, '--out', out, '--ins-per', 1) is None
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    for line, (direction, fmt) in zip(
        lines, [('AtoB', 'nnp'), ('AtoB', 'onnx'), ('BtoA', 'nnp'), ('BtoA', 'onnx')]
    ):
        file = out / f'generator_{direction}_32x24_k1.{fmt}'
        assert line.startswith(f'export.py: {direction} {fmt}: {file} (')
        assert 'largest difference from NNabla' in line and 'over 1 input(s)' in line
        difference = float(line.split('from NNabla ')[1].split()[0])
        assert difference <= exporting.LIMITS[fmt]
    assert sorted(os.listdir(out)) == sorted(
        f'generator_{d}_32x24_k1.{f}' for d in DIRECTIONS for f in ['nnp', 'onnx']
    )
    assert 'tensorflow' not in sys.modules


def test_export_one_direction_one_format_with_a_chosen_photo(model, tmp_path, capsys):
    save_example(tmp_path / 'photos', 'testA', 'p', noise(4), [rectangle(10, 10, 50, 40)])
    out = tmp_path / 'out'
    code = exit_of(
        '--params', model, '--out', out, '--direction', 'BtoA', '--format', 'onnx',
        '--opset', 13, '--fineSizeH', 16, '--fineSizeW', 40,
        '--check-image', tmp_path / 'photos' / 'testA' / 'p.png',
    )  # fmt: skip
    assert code is None
    assert os.listdir(out) == ['generator_BtoA_16x40_k2.onnx']
    assert onnx.load(str(out / 'generator_BtoA_16x40_k2.onnx')).opset_import[0].version == 13
    assert 'over 1 input(s)' in capsys.readouterr().out


@pytest.mark.parametrize('fmt, limit', [('nnp', -1.0), ('onnx', 0.0)])
def test_a_file_above_its_limit_is_not_kept_and_the_exit_is_non_zero(
    fmt, limit, model, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(exporting.LIMITS, fmt, limit)
    out = tmp_path / 'out'
    code = exit_of('--params', model, '--out', out, '--direction', 'AtoB', '--format', fmt)
    file = out / f'generator_AtoB_32x24_k2.{fmt}'
    assert one_line_error(code, capsys).startswith(f'export.py: {file} differs from NNabla by up to ')
    assert code.endswith(f'(limit {limit:g} for {fmt}); not written')
    assert os.listdir(out) == []


BAD_FLAGS = [
    (['--opset', '7'], "argument --opset: '7' is not an opset this generator exports at"),
    (['--opset', '12'], "argument --opset: '12' is not an opset"),
    (['--opset', 'x'], "argument --opset: 'x' is not an opset"),
    (['--fineSizeH', '30'], "argument --fineSizeH: '30' is not a multiple of 4, at least 8"),
    (['--fineSizeW', '4'], "argument --fineSizeW: '4' is not a multiple of 4, at least 8"),
    (['--ins-per', '0'], "argument --ins-per: '0' is not a positive integer"),
    (['--format', 'tflite'], 'argument --format: invalid choice'),
    (['--direction', 'AtoC'], 'argument --direction: invalid choice'),
    (['--check-masks', 'm.png'], '--check-masks goes with --check-image'),
]


@pytest.mark.parametrize('flags, words', BAD_FLAGS)
def test_bad_flags_are_usage_errors(flags, words, model, tmp_path, capsys):
    code = exit_of('--params', model, '--out', tmp_path / 'out', *flags)
    line = one_line_error(code, capsys)
    assert line.startswith('export.py: error: ' + words)
    assert not (tmp_path / 'out').exists()


def test_the_size_flags_refuse_exactly_what_the_networks_refuse(capsys):
    """--fineSizeH and --fineSizeW are parsed by the rule of models.check_sizes."""
    for size in range(-4, 101):
        try:
            models.check_sizes(size, 8)
            networks_take = True
        except ValueError:
            networks_take = False
        parser = export.get_parser()
        try:
            parser.parse_args(['--params', 'x.h5', '--out', 'o', '--fineSizeH', str(size)])
            flag_takes = True
        except SystemExit:
            flag_takes = False
        assert flag_takes == networks_take, size


def test_a_size_the_networks_refuse_in_the_models_state_is_refused(model, tmp_path, capsys):
    """A state.json that says 30 rows is refused as damaged, naming it."""
    params = save_generators(tmp_path / 'checkpoint')
    state = json.loads((params.parent / 'state.json').read_text())
    state['args']['fineSizeH'] = 30
    (params.parent / 'state.json').write_text(json.dumps(state))
    code = exit_of('--params', params, '--out', tmp_path / 'out')
    assert one_line_error(code, capsys) == (
        f"export.py: {params.parent / 'state.json'}: damaged: args.fineSizeH: '30' is not a "
        'multiple of 4, at least 8'
    )
    assert not (tmp_path / 'out').exists()


def not_generators(tmp_path):
    """(flags, the refusal's start) for files and folders that hold no generator."""
    text = tmp_path / 'notes.h5'
    text.write_text('not a parameter file')
    nn.clear_parameters()
    with nn.parameter_scope('discriminator_x'):
        models.discriminator(nn.Variable((1, 3, 32, 24)), nn.Variable((1, 1, 32, 24)), ndf=4)
    (tmp_path / 'd').mkdir()
    nn.save_parameters(str(tmp_path / 'd' / 'parameters.h5'))
    nn.clear_parameters()
    (tmp_path / 'empty').mkdir()
    return [
        (['--params', text], f'{text}: damaged or not a parameter file ('),
        (
            ['--params', tmp_path / 'd' / 'parameters.h5'],
            f'{tmp_path / "d" / "parameters.h5"}: holds no generator_x2y parameters',
        ),
        (['-o', tmp_path / 'empty'], f'{tmp_path / "empty"}: no model found'),
    ]


def test_a_file_that_is_not_a_generator_is_refused(tmp_path, capsys):
    for flags, words in not_generators(tmp_path):
        code = exit_of(*flags, '--out', tmp_path / 'out')
        assert one_line_error(code, capsys).startswith('export.py: ' + words)
    assert not (tmp_path / 'out').exists()


def test_out_that_would_overwrite_an_input_or_join_a_dataset_is_refused(model, tmp_path, capsys):
    photos = tmp_path / 'photos'
    save_example(photos, 'trainA', 'p', noise(5), [rectangle(10, 10, 50, 40)])
    (tmp_path / 'afile').write_text('')
    run = tmp_path / 'run'
    save_generators(run / 'checkpoint_000000002')
    image = photos / 'trainA' / 'p.png'
    cases = [
        (['--params', model], model.parent, f'holds the input {model}; choose another folder'),
        (['-o', run], run, 'is the --model-save-path folder; choose another folder'),
        (['--params', model], tmp_path / 'afile', 'is a file'),
        (
            ['--params', model, '--check-image', image],
            photos / 'trainA',
            f'holds the input {image}; choose another folder',
        ),
        (
            ['--params', model],
            photos / 'trainA_seg' / 'new',
            f"lies in {photos / 'trainA_seg'}, which is a dataset's mask folder; choose another folder",
        ),
        (
            ['--params', model, '--check-dataroot', photos],
            photos,
            'is the --check-dataroot folder; choose another folder',
        ),
        (
            ['--params', model, '--check-dataroot', photos],
            photos / 'trainA',
            f"is a dataset's image folder (beside {photos / 'trainA'}_seg); choose another folder",
        ),
    ]
    before = {p: p.read_bytes() for p in tmp_path.rglob('*') if p.is_file()}
    for flags, out, reason in cases:
        code = exit_of(*flags, '--out', out, '--direction', 'AtoB')
        assert one_line_error(code, capsys) == f'export.py: --out {out} {reason}'
    assert {p: p.read_bytes() for p in tmp_path.rglob('*') if p.is_file()} == before


def test_a_check_image_without_masks_is_refused(model, tmp_path, capsys):
    photo = tmp_path / 'photo.png'
    Image.fromarray(noise(6)).save(photo)
    code = exit_of('--params', model, '--out', tmp_path / 'out', '--check-image', photo)
    assert one_line_error(code, capsys).startswith(f'export.py: {photo}: no instance masks given or found')


def test_ctrl_c_during_start_up_is_one_line(model, tmp_path):
    """export.py takes the stop signals over before its slow imports, as translate.py does."""
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, 'export.py'), '--params', str(model), '--out',
         str(tmp_path / 'out')],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for(lambda: catches_sigterm(process.pid))
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 130
    assert 'Traceback' not in stderr
    assert stderr.strip().splitlines()[-1].startswith('export.py: stopped by SIGINT')


def test_time_reports_every_runtime(model, tmp_path, capsys):
    code = exit_of('--params', model, '--out', tmp_path / 'out', '--direction', 'AtoB',
                   '--time', 1)  # fmt: skip
    assert code is None
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith('export.py: AtoB time per image (one pass, K=2, median of 1 rounds')
    for runtime in ['NnpLoader (nnp)', 'onnxruntime (onnx)', 'NNabla --cpu-conv nnabla',
                    'NNabla --cpu-conv blas']:  # fmt: skip
        assert f'{runtime} ' in line and ' ms' in line


# examples/onnx_translate.py: onnxruntime alone.

EXAMPLE = os.path.join(ROOT, 'examples', 'onnx_translate.py')


def test_the_example_imports_neither_nnabla_nor_the_project():
    tree = ast.parse(open(EXAMPLE, encoding='utf-8').read())
    imported = {
        alias.name.split('.')[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {node.module.split('.')[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported == {'argparse', 'math', 'os', 'numpy', 'onnxruntime', 'PIL'}


def test_the_onnxruntime_example_chains_passes_as_the_translator_does(model, tmp_path):
    """Three instances, two slots a pass: two passes, the second padded with an empty slot."""
    config = config_of(model, FINE, 2)
    path = exported(model, 'AtoB', config, tmp_path)['onnx']
    masks = [rectangle(5, 5, 20, 20), rectangle(30, 20, 60, 50), rectangle(60, 5, 30, 10)]
    save_example(tmp_path / 'photos', 'testA', 'p', noise(8), masks)
    image_file = tmp_path / 'photos' / 'testA' / 'p.png'
    mask_files = [tmp_path / 'photos' / 'testA_seg' / f'p_{i}.png' for i in range(3)]
    result = subprocess.run(
        [sys.executable, EXAMPLE, str(path), '--image', str(image_file), '--masks',
         *map(str, mask_files), '--out', str(tmp_path / 'out.png'), '--npz',
         str(tmp_path / 'out.npz')],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / 'out.npz') as saved:
        image_out, masks_out = saved['image'], saved['masks']

    image, mask_values, photo_size = load_resized(image_file, mask_files, FINE)
    order = largest_first(mask_values)
    assert list(order) == [1, 0, 2]
    nn.clear_parameters()
    expected_image, sorted_masks = Translator(str(model), 'AtoB', config)(image, mask_values[order])
    expected_masks = np.empty_like(sorted_masks)
    expected_masks[order] = sorted_masks
    np.testing.assert_allclose(image_out, expected_image, rtol=0, atol=1e-4)
    np.testing.assert_allclose(masks_out, expected_masks, rtol=0, atol=1e-4)

    written = np.asarray(Image.open(tmp_path / 'out.png'))
    assert written.shape == photo_size + (3,)
    for index in range(3):
        assert np.asarray(Image.open(tmp_path / f'out_{index}.png')).shape == photo_size
