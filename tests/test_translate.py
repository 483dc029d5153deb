"""translate.py: every flag checked, inputs never overwritten, colliding outputs refused,
damaged checkpoints named, Ctrl-C at any moment, and the full-resolution output."""

import json
import os
import signal
import subprocess
import sys
import time

import nnabla as nn
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from test_data import save_example

import models
import translate
from conftest import ROOT
from runtime.signals import StopRequest

NGF, N_BLOCKS, FINE = 4, 1, (32, 24)
PHOTO = (96, 72)  # (H, W): three times the network size


@pytest.fixture(autouse=True)
def restore_context():
    """translate.main sets the default context for the whole process."""
    context = nn.get_current_context()
    yield
    nn.set_default_context(context)


def save_generators(folder, mask_bias=None):
    """folder/parameters.h5 with random generators of both directions, and its state.json.
    mask_bias: the mask decoder's last bias, -10 for translated masks that are all empty."""
    folder.mkdir(parents=True, exist_ok=True)
    nn.clear_parameters()
    nn.seed(0)
    for scope in ['generator_x2y', 'generator_y2x']:
        with nn.parameter_scope(scope):
            models.generator(nn.Variable((1, 3) + FINE), nn.Variable((1, 1) + FINE), NGF, N_BLOCKS)
            if mask_bias is not None:
                nn.get_parameters()['mask_decoder/out/conv/b'].d = mask_bias
    nn.save_parameters(str(folder / 'parameters.h5'))
    nn.clear_parameters()
    state = {
        'iteration': 1,
        'args': {'ngf': NGF, 'n_blocks': N_BLOCKS, 'ins_per': 2, 'fineSizeH': FINE[0], 'fineSizeW': FINE[1]},
    }
    (folder / 'state.json').write_text(json.dumps(state))
    return folder / 'parameters.h5'


def rectangle(top, left, height, width, size=PHOTO):
    mask = np.zeros(size, bool)
    mask[top : top + height, left : left + width] = True
    return mask


def noise(seed, size=PHOTO):
    return np.random.RandomState(seed).randint(0, 256, size + (3,)).astype(np.uint8)


@pytest.fixture(scope='module')
def model(tmp_path_factory):
    return save_generators(tmp_path_factory.mktemp('models') / 'checkpoint_000000001')


@pytest.fixture
def photos(tmp_path):
    """testA with three noise photos, one of them with two masks."""
    root = tmp_path / 'photos'
    save_example(root, 'testA', 'a', noise(0), [rectangle(20, 10, 40, 30)])
    save_example(root, 'testA', 'b', noise(1), [rectangle(10, 5, 30, 20), rectangle(50, 30, 30, 30)])
    save_example(root, 'testA', 'c', noise(2), [rectangle(30, 30, 50, 40)])
    return root


def exit_of(*argv):
    """translate.main's SystemExit code: the only way out it may take on bad input."""
    with pytest.raises(SystemExit) as exit:
        translate.main([str(a) for a in argv])
    return exit.value.code


def snapshot(root):
    return {path: path.read_bytes() if path.is_file() else None for path in root.rglob('*')}


def one_line_error(code, capsys):
    """The one line a non-zero exit printed: argparse's error or translate.py's message."""
    assert code not in (0, None)
    stderr = capsys.readouterr().err
    assert 'Traceback' not in stderr
    if code == 2:
        assert stderr.startswith('usage: translate.py')
        return stderr.strip().splitlines()[-1]
    assert isinstance(code, str) and '\n' not in code
    return code


# Every flag that takes a value, with values that must be refused: zero, negative, out of
# range, empty, or valid for the parser but not for the model (ngf 4, n_blocks 1).
BAD_VALUES = {
    '--model-save-path': ['', '0'],
    '--params': ['', '0', '-1.h5', 'parameters.txt'],
    '--direction': ['0', 'CtoD'],
    '--out': [''],
    '--dataroot': ['', '0', '-1'],
    '--image': ['', '0', '-1'],
    '--phase': ['', '0', '-1'],
    '--masks': ['', '0', '-1'],
    '--context': ['0', 'gpu'],
    '--device-id': ['-1', 'x', '1.5'],
    '--cpu-conv': ['0', 'mkl'],
    '--type-config': ['half', 'double'],
    '--ngf': ['0', '-2', '3', '1.5'],
    '--n-blocks': ['-1', '0', '2'],
    '--ins-per': ['0', '-1', '1.5'],
    '--fineSizeH': ['0', '-4', '4', '30', 'x'],
    '--fineSizeW': ['0', '-4', '4', '22', '1e3'],
    '--mask-predictor': ['', '0'],
    '--source-category': [''],
    '--min-instance-area': ['-0.1', '1', 'x', 'nan'],
}


def test_the_walk_covers_every_flag():
    parser = translate.get_parser()
    flags = {
        action.option_strings[0] for action in parser._actions if action.option_strings and action.nargs != 0
    }
    assert flags == set(BAD_VALUES)


@pytest.mark.parametrize(
    'flag, value', [(flag, value) for flag, values in BAD_VALUES.items() for value in values]
)
def test_every_flag_refuses_bad_values_with_one_line(flag, value, model, photos, tmp_path, capsys):
    args = {
        '--params': model,
        '--image': photos / 'testA' / 'a.png',
        '--masks': photos / 'testA_seg' / 'a_0.png',
        '--out': tmp_path / 'out',
    }
    if flag == '--model-save-path':
        del args['--params']
    if flag in ['--dataroot', '--phase']:
        del args['--image'], args['--masks']
        args['--dataroot'] = photos
    args[flag] = value
    line = one_line_error(exit_of(*[part for item in args.items() for part in item]), capsys)
    assert line.startswith('translate.py: ')
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize(
    'flag, value',
    [
        ('--ins-per', '0'),
        ('--fineSizeH', '0'),
        ('--fineSizeW', '22'),
        ('--ngf', '-1'),
        ('--n-blocks', '-1'),
        ('--device-id', '-1'),
    ],
)
def test_bad_numbers_end_the_process_with_argparse_usage(flag, value, model, photos, tmp_path):
    """--ins-per 0 and --fineSizeH 0 used to kill the process with a floating-point exception."""
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, 'translate.py'),
            '--params',
            str(model),
            '--dataroot',
            str(photos),
            '--out',
            str(tmp_path / 'out'),
            flag,
            value,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f'translate.py: error: argument {flag}')


@pytest.mark.parametrize(
    'flags, message',
    [
        (
            ['--masks', 'x_0.png'],
            '--masks goes with --image; with --dataroot the masks are read from {phase}A_seg or {phase}B_seg',
        ),
        (
            ['--image', 'x.png', '--masks', 'x_0.png', '--mask-predictor', 'p'],
            '--mask-predictor goes with predicted masks, not with --masks',
        ),
        (
            ['--image', 'x.png', '--masks', 'x_0.png', '--split-instances'],
            '--split-instances goes with predicted masks, not with --masks',
        ),
        (
            ['--image', 'x.png', '--min-instance-area', '0.1'],
            '--min-instance-area goes with --split-instances',
        ),
        (
            ['--image', 'x.png', '--masks', 'x_0.png', '--phase', 'train'],
            '--phase goes with --dataroot, not with --image',
        ),
    ],
)
def test_flags_that_would_be_ignored_are_usage_errors(flags, message, model, capsys):
    inputs = [] if '--image' in flags else ['--dataroot', 'photos']
    code = exit_of('--params', model, '--out', 'out', *inputs, *flags)
    assert one_line_error(code, capsys) == 'translate.py: error: ' + message


def outs_holding_inputs(model, photos, tmp_path):
    """(--out, words of the refusal) for every folder translate.py reads or a dataset uses."""
    (tmp_path / 'link').symlink_to(photos / 'testA')
    (tmp_path / 'afile').write_text('')
    os.makedirs(photos / 'testB_seg')
    return [
        (photos / 'testA', 'holds the input {}'.format(photos / 'testA' / 'a.png')),
        (str(photos / 'testA') + '/', 'holds the input {}'.format(photos / 'testA' / 'a.png')),
        (photos / 'testA_seg', 'holds the input {}'.format(photos / 'testA_seg' / 'a_0.png')),
        (tmp_path / 'link', 'holds the input {}'.format(photos / 'testA' / 'a.png')),
        (photos / 'testA' / '..' / 'testA', 'holds the input {}'.format(photos / 'testA' / 'a.png')),
        (model.parent, f'holds the input {model}'),
        (photos, 'is the --dataroot folder'),
        (model.parent.parent, 'is the --model-save-path folder'),
        (photos / 'testB_seg', "is a dataset's mask folder"),
        (photos / 'trainB', "is a dataset's image folder (beside {}_seg)".format(photos / 'trainB')),
        (tmp_path / 'afile', 'is a file'),
    ]


def test_out_never_holds_an_input_nor_a_dataset_folder(model, photos, tmp_path, capsys):
    cases = outs_holding_inputs(model, photos, tmp_path)
    os.makedirs(photos / 'trainB_seg')
    before = snapshot(tmp_path)
    for out, reason in cases:
        source = (
            ['--model-save-path', model.parent.parent] if 'model-save-path' in reason else ['--params', model]
        )
        code = exit_of(*source, '--dataroot', photos, '--out', out)
        assert one_line_error(code, capsys) == (
            f'translate.py: --out {out} {reason}'
            + ('' if reason == 'is a file' else '; choose another folder')
        )
    assert snapshot(tmp_path) == before


def test_out_that_cannot_be_made(model, photos, tmp_path, capsys):
    (tmp_path / 'afile').write_text('')
    out = tmp_path / 'afile' / 'out'
    code = exit_of('--params', model, '--dataroot', photos, '--out', out)
    assert one_line_error(code, capsys) == (
        f'translate.py: --out {out} is not a writable folder (Not a directory)'
    )


def test_out_relative_to_the_current_folder(model, photos, monkeypatch, capsys):
    monkeypatch.chdir(photos / 'testA_seg')
    before = snapshot(photos)
    code = exit_of('--params', model, '--image', '../testA/a.png', '--masks', 'a_0.png', '--out', '.')
    assert one_line_error(code, capsys) == (
        'translate.py: --out . holds the input a_0.png; choose another folder'
    )
    assert snapshot(photos) == before


@pytest.mark.parametrize(
    'other, flags', [('a_0.png', []), ('a_tile.png', []), ('a_full.png', []), ('b_1.jpg', ['--no-full'])]
)
def test_colliding_output_names_are_refused_before_writing(other, flags, model, photos, tmp_path, capsys):
    Image.fromarray(noise(3)).save(photos / 'testA' / other)
    first, written = ('b', 'b_1.png') if other.startswith('b') else ('a', other)
    code = exit_of('--params', model, '--dataroot', photos, '--out', tmp_path / 'out', *flags)
    assert one_line_error(code, capsys) == (
        'translate.py: {} and {} would both write {}; rename one'.format(
            photos / 'testA' / (first + '.png'), photos / 'testA' / other, tmp_path / 'out' / written
        )
    )
    assert not (tmp_path / 'out').exists()


def test_full_output_of_an_image_named_like_one_is_no_collision_with_no_full(model, photos, tmp_path):
    Image.fromarray(noise(3)).save(photos / 'testA' / 'a_full.png')
    Image.fromarray(np.full(PHOTO, 255, np.uint8)).save(photos / 'testA_seg' / 'a_full_0.png')
    translate.main(
        ['--params', str(model), '--dataroot', str(photos), '--no-full', '--out', str(tmp_path / 'out')]
    )
    names = set(os.listdir(tmp_path / 'out'))
    assert {'a.png', 'a_full.png', 'a_full_0.png', 'a_full_tile.png'} <= names
    assert not any(name.endswith('_full.png') and name != 'a_full.png' for name in names)


def test_two_images_of_one_name_are_refused(model, photos, tmp_path, capsys):
    Image.fromarray(noise(3)).save(photos / 'testA' / 'a.jpg')
    code = exit_of('--params', model, '--dataroot', photos, '--out', tmp_path / 'out')
    assert one_line_error(code, capsys) == (
        'translate.py: {} and {}: two images named a, which would share the masks a_0.png, '
        '...; rename one'.format(photos / 'testA' / 'a.jpg', photos / 'testA' / 'a.png')
    )


@pytest.mark.parametrize(
    'flags, state_sizes, made, given',
    [
        (['--n-blocks', '0'], {}, '--n-blocks 1', '--n-blocks 0'),
        (['--n-blocks', '2'], {}, '--n-blocks 1', '--n-blocks 2'),
        (['--ngf', '8'], {}, '--ngf 4', '--ngf 8'),
        (
            ['--ngf', '100000000', '--n-blocks', '3'],
            {},
            '--ngf 4 --n-blocks 1',
            '--ngf 100000000 --n-blocks 3',
        ),
        ([], {'n_blocks': 9}, '--n-blocks 1', '--n-blocks 9'),  # a state.json that disagrees
    ],
)
def test_network_sizes_other_than_the_parameters_are_refused(
    flags, state_sizes, made, given, model, photos, tmp_path, capsys
):
    params = save_generators(tmp_path / 'checkpoint')
    state = json.loads((params.parent / 'state.json').read_text())
    state['args'].update(state_sizes)
    (params.parent / 'state.json').write_text(json.dumps(state))
    code = exit_of('--params', params, '--dataroot', photos, '--out', tmp_path / 'out', *flags)
    assert one_line_error(code, capsys) == f'translate.py: {params} was made with {made}, not {given}'


def edit_parameters(params, change):
    """Rewrite a parameter file after change(dict of name -> Variable)."""
    nn.clear_parameters()
    nn.load_parameters(str(params))
    change(nn.get_parameters(grad_only=False))
    nn.save_parameters(str(params))
    nn.clear_parameters()


def damage(kind, params):
    """Damage a checkpoint; returns the damaged file and the words naming what is wrong."""
    state = params.parent / 'state.json'
    if kind == 'truncated parameters':
        params.write_bytes(params.read_bytes()[:3000])
        return params, ': damaged or not a parameter file (OSError: '
    if kind == 'parameters not HDF5':
        params.write_text('not hdf5')
        return params, ': damaged or not a parameter file (OSError: '
    if kind == 'empty parameters':
        params.write_bytes(b'')
        return params, ': damaged or not a parameter file (OSError: '
    if kind == 'parameter missing':
        edit_parameters(params, lambda p: nn.parameter.pop_parameter('generator_x2y/mask_decoder/out/conv/W'))
        return (params, ': generator_x2y/mask_decoder/out/conv/W is missing, and the generator needs it')
    if kind == 'parameter left over':
        edit_parameters(
            params,
            lambda p: nn.parameter.get_parameter_or_create(
                'generator_x2y/image_encoder/extra/conv/W', (2, 2)
            ),
        )
        return params, ': generator_x2y/image_encoder/extra/conv/W is not used by the generator'
    if kind == 'parameter of another shape':

        def reshape(parameters):
            nn.parameter.pop_parameter('generator_x2y/image_decoder/out/conv/b')
            nn.parameter.get_parameter_or_create('generator_x2y/image_decoder/out/conv/b', (4,))

        edit_parameters(params, reshape)
        return params, ': generator_x2y/image_decoder/out/conv/b is (4,), the generator needs (3,)'
    if kind == 'NaN parameter':

        def poison(parameters):
            parameters['generator_x2y/mask_encoder/down0/conv/W'].d[0, 0, 0, 0] = np.nan

        edit_parameters(params, poison)
        return params, ': generator_x2y/mask_encoder/down0/conv/W holds NaN or infinite values'
    if kind == 'no generator of the direction':
        edit_parameters(
            params,
            lambda parameters: [
                nn.parameter.pop_parameter(name) for name in list(parameters) if 'x2y' in name
            ],
        )
        return params, ': holds no generator_x2y parameters'
    if kind == 'truncated state':
        state.write_text(state.read_text()[:20])
        return state, ': unreadable or damaged (JSONDecodeError: '
    if kind == 'state not UTF-8':
        state.write_bytes(b'\xff\xfe{}')
        return state, ': unreadable or damaged (UnicodeDecodeError: '
    if kind == 'state a list':
        state.write_text('[1, 2]')
        return state, ': unreadable or damaged (TypeError: '
    if kind == 'state without args':
        state.write_text('{"iteration": 3}')
        return state, ": unreadable or damaged (KeyError: 'args')"
    values = {
        'state ngf 0': ('ngf', 0, ": damaged: args.ngf: '0' is not a positive integer"),
        'state fineSizeH 30': (
            'fineSizeH',
            30,
            ": damaged: args.fineSizeH: '30' is not a multiple of 4, at least 8",
        ),
        'state ins_per true': ('ins_per', True, ": damaged: args.ins_per: 'True' is not a positive integer"),
    }
    name, value, words = values[kind]
    saved = json.loads(state.read_text())
    saved['args'][name] = value
    state.write_text(json.dumps(saved))
    return state, words


DAMAGE = [
    'truncated parameters',
    'parameters not HDF5',
    'empty parameters',
    'parameter missing',
    'parameter left over',
    'parameter of another shape',
    'NaN parameter',
    'no generator of the direction',
    'truncated state',
    'state not UTF-8',
    'state a list',
    'state without args',
    'state ngf 0',
    'state fineSizeH 30',
    'state ins_per true',
]


@pytest.mark.parametrize('kind', DAMAGE)
def test_a_damaged_checkpoint_is_named_in_one_line(kind, photos, tmp_path, capsys):
    params = save_generators(tmp_path / 'checkpoint')
    damaged, words = damage(kind, params)
    code = exit_of('--params', params, '--dataroot', photos, '--out', tmp_path / 'out')
    assert one_line_error(code, capsys).startswith(f'translate.py: {damaged}{words}')
    assert not (tmp_path / 'out').exists()


def test_state_json_lacking_flags_asks_for_all_at_once(model, photos, tmp_path, capsys):
    """--ngf and --n-blocks are read from the parameters' shapes; what they cannot say is
    asked for in one line."""
    params = save_generators(tmp_path / 'checkpoint')
    (params.parent / 'state.json').write_text('{"args": {"ngf": 4}}')
    code = exit_of('--params', params, '--dataroot', photos, '--out', tmp_path / 'out')
    assert one_line_error(code, capsys) == (
        f'translate.py: {params}: its state.json does not say ins_per, fineSizeH, fineSizeW; '
        'give --ins-per N --fineSizeH N --fineSizeW N'
    )
    (params.parent / 'state.json').unlink()
    code = exit_of('--params', params, '--dataroot', photos, '--out', tmp_path / 'out')
    assert one_line_error(code, capsys) == (
        f'translate.py: {params}: no state.json beside it says ins_per, fineSizeH, fineSizeW; '
        'give --ins-per N --fineSizeH N --fineSizeW N'
    )
    translate.main(
        [
            str(a)
            for a in [
                '--params',
                params,
                '--dataroot',
                photos,
                '--out',
                tmp_path / 'out',
                '--ins-per',
                '1',
                '--fineSizeH',
                FINE[0],
                '--fineSizeW',
                FINE[1],
            ]
        ]
    )
    assert (tmp_path / 'out' / 'index.html').exists()


class StubTranslator:
    """Stands for the network: the image becomes mid grey, each mask moves `shift` columns."""

    size = FINE

    def __init__(self, shift=0):
        self.shift = shift

    def __call__(self, image, masks):
        return np.zeros_like(image), np.roll(masks, self.shift, axis=2)


def read(path):
    return np.asarray(Image.open(path))


def test_full_output_is_the_photo_outside_the_dilated_masks(tmp_path):
    photo, source = noise(5), rectangle(30, 20, 40, 24)
    save_example(tmp_path, 'testA', 'p', photo, [source])
    translate.translate_one(
        StubTranslator(shift=3),
        str(tmp_path / 'testA' / 'p.png'),
        [tmp_path / 'testA_seg' / 'p_0.png'],
        str(tmp_path),
    )
    full, translated = read(tmp_path / 'p_full.png'), read(tmp_path / 'p.png')
    translated_mask = read(tmp_path / 'p_0.png') > 127
    assert full.shape == photo.shape and translated.shape == photo.shape
    union = source | translated_mask
    assert (translated_mask & ~source).sum() > 100  # the translation moved the mask
    width = translate.feather_width(PHOTO, FINE)
    assert width == 3
    disc = np.hypot(*np.mgrid[-width : width + 1, -width : width + 1]) <= width
    dilated = ndimage.binary_dilation(union, structure=disc)
    outside = ~dilated
    assert outside.sum() > PHOTO[0] * PHOTO[1] / 2
    np.testing.assert_array_equal(full[outside], photo[outside])
    assert (translated[outside] != photo[outside]).any()  # the network changed it; not kept
    np.testing.assert_array_equal(full[union], translated[union])
    band = dilated & ~union
    blend = full[band].astype(int)
    low = np.minimum(photo[band], translated[band]).astype(int)
    high = np.maximum(photo[band], translated[band]).astype(int)
    assert ((blend >= low) & (blend <= high)).all()
    assert ((blend != photo[band]) & (blend != translated[band])).any()  # it fades


def test_feather_width_is_at_least_one_network_pixel():
    assert translate.feather_width((96, 72), (32, 24)) == 3
    assert translate.feather_width((64, 48), (32, 24)) == 3
    assert translate.feather_width((3000, 2000), (300, 200)) == 10
    assert translate.feather_width((100, 100), (32, 24)) == 5


def test_translated_masks_are_written_in_the_order_of_the_mask_files(tmp_path):
    small, large = rectangle(5, 5, 10, 10), rectangle(40, 20, 50, 40)
    save_example(tmp_path, 'testA', 'p', noise(6), [small, large])
    translate.translate_one(
        StubTranslator(),
        str(tmp_path / 'testA' / 'p.png'),
        [tmp_path / 'testA_seg' / 'p_0.png', tmp_path / 'testA_seg' / 'p_1.png'],
        str(tmp_path),
        full=False,
    )
    for index, mask in enumerate([small, large]):
        written = read(tmp_path / f'p_{index}.png') > 127
        assert (written & mask).sum() / (written | mask).sum() > 0.8
    assert not (tmp_path / 'p_full.png').exists()


def test_full_output_end_to_end(tmp_path):
    """The real network, its translated masks made empty: NAME_full.png is the photo except
    within the feather width of the source masks, where the translation is."""
    params = save_generators(tmp_path / 'checkpoint', mask_bias=-10.0)
    photo, source = noise(7), rectangle(20, 10, 40, 30)
    save_example(tmp_path / 'photos', 'testA', 'a', photo, [source])
    translate.main(
        ['--params', str(params), '--dataroot', str(tmp_path / 'photos'), '--out', str(tmp_path / 'out')]
    )
    out = tmp_path / 'out'
    assert not (read(out / 'a_0.png') > 127).any()
    full, translated = read(out / 'a_full.png'), read(out / 'a.png')
    distance = ndimage.distance_transform_edt(~source)
    outside = distance >= translate.feather_width(PHOTO, FINE)
    np.testing.assert_array_equal(full[outside], photo[outside])
    np.testing.assert_array_equal(full[source], translated[source])
    assert (translated[source] != photo[source]).any()
    translate.main(
        [
            '--params',
            str(params),
            '--dataroot',
            str(tmp_path / 'photos'),
            '--out',
            str(tmp_path / 'no_full'),
            '--no-full',
        ]
    )
    assert sorted(os.listdir(tmp_path / 'no_full')) == ['a.png', 'a_0.png', 'a_tile.png', 'index.html']


@pytest.fixture(scope='module')
def many_photos(tmp_path_factory):
    """40 inputs: long enough to interrupt in the middle."""
    root = tmp_path_factory.mktemp('many')
    for index in range(40):
        save_example(
            root, 'testA', f'{index:02d}', noise(index, (192, 144)), [rectangle(40, 30, 80, 60, (192, 144))]
        )
    return root


def start(model, dataroot, out):
    return subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, 'translate.py'),
            '--params',
            str(model),
            '--dataroot',
            str(dataroot),
            '--out',
            str(out),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def assert_complete(out):
    """Every file written is whole: no temporary file left, each tile listed exists."""
    if not out.exists():
        return
    assert not [name for name in os.listdir(out) if '.partial' in name]
    if (out / 'index.html').exists():
        listed = (out / 'index.html').read_text().count('<img src=')
        assert listed == len([name for name in os.listdir(out) if name.endswith('_tile.png')])


def catches_sigterm(pid):
    """Whether the process has a SIGTERM handler (Linux): Python catches SIGINT from its own
    start-up on, SIGTERM only once translate.py's first lines have run."""
    with open(f'/proc/{pid}/status') as f:
        caught = int(next(line for line in f if line.startswith('SigCgt:')).split()[1], 16)
    return bool(caught & 1 << (signal.SIGTERM - 1))


@pytest.mark.parametrize('delay', [0, 0.2, 0.5])
def test_ctrl_c_during_start_up_is_one_line(delay, model, many_photos, tmp_path):
    """From translate.py's first line on: the imports, reading the checkpoint, building the
    graph. (A Ctrl-C in Python's own start-up, before that, is Python's to report.)"""
    process = start(model, many_photos, tmp_path / 'out')
    wait_for(lambda: catches_sigterm(process.pid))
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 130
    assert 'Traceback' not in stderr
    assert stderr.strip().splitlines()[-1].startswith('translate.py: stopped by SIGINT')
    assert_complete(tmp_path / 'out')


@pytest.mark.parametrize('stop_signal', [signal.SIGINT, signal.SIGTERM])
def test_stop_while_translating_finishes_the_current_input(stop_signal, model, many_photos, tmp_path):
    out = tmp_path / 'out'
    process = start(model, many_photos, out)
    wait_for(lambda: (out / '00_tile.png').exists())
    process.send_signal(stop_signal)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 128 + stop_signal
    assert 'Traceback' not in stderr
    last = stderr.strip().splitlines()[-1]
    done = len([name for name in os.listdir(out) if name.endswith('_tile.png')])
    assert 0 < done < 40
    assert last == (
        'translate.py: stopped by {} after {} of 40 inputs (0 failed); {} lists the translated ones'.format(
            signal.Signals(stop_signal).name, done, out / 'index.html'
        )
    )
    assert_complete(out)


def test_a_second_stop_request_ends_at_once():
    """Checked in this process: the subprocess tests cannot time a second signal to land
    while an input is still being translated."""
    previous = signal.getsignal(signal.SIGINT)
    exits = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, '_exit', exits.append)
        with StopRequest('stopping after this input') as stop:
            stop.deferring = True
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.received == signal.SIGINT and exits == []
            os.kill(os.getpid(), signal.SIGTERM)
            assert exits == [128 + signal.SIGTERM]
    assert signal.getsignal(signal.SIGINT) is previous
