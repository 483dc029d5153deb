"""Every bad input to train.py gets one line naming the file or flag, and a non-zero exit."""

import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image
from test_train import TINY

import train
from conftest import ROOT
from runtime.device import cuda_installed


def error_of(tmp_path, *flags, dataroot=None):
    argv = (
        TINY
        + [
            '--max-epoch',
            '1',
            '--monitor-path',
            str(tmp_path / 'monitor'),
            '--model-save-path',
            str(tmp_path / 'models'),
        ]
        + list(flags)
    )
    if dataroot is not None:
        argv += ['--dataroot', str(dataroot)]
    with pytest.raises(SystemExit) as error:
        train.main(argv)
    return str(error.value)


def test_missing_and_empty_dataroot(tmp_path):
    missing = tmp_path / 'nowhere'
    assert error_of(tmp_path, dataroot=missing) == (
        f'train.py: {missing}: dataset folder not found (datasets/generate_ccp_dataset.py makes one)'
    )
    empty = tmp_path / 'empty'
    empty.mkdir()
    assert error_of(tmp_path, dataroot=empty) == 'train.py: {}: folder not found'.format(empty / 'trainA')
    assert not (tmp_path / 'monitor').exists() and not (tmp_path / 'models').exists()


def test_domain_folder_without_images(tmp_path, dataset):
    for image in (dataset / 'trainB').iterdir():
        image.unlink()
    assert error_of(tmp_path, dataroot=dataset) == (
        'train.py: {}: no images (.png, .jpg, .jpeg, .bmp)'.format(dataset / 'trainB')
    )


def test_image_without_mask_and_mask_without_image(tmp_path, dataset):
    mask = sorted((dataset / 'trainA_seg').iterdir())[0]
    shutil.move(str(mask), str(tmp_path / 'kept.png'))
    image = dataset / 'trainA' / mask.name.replace('_0.png', '.png')
    assert error_of(tmp_path, dataroot=dataset) == (f'train.py: {image}: no instance mask (expected {mask})')
    shutil.move(str(tmp_path / 'kept.png'), str(mask))
    image.unlink()
    assert error_of(tmp_path, dataroot=dataset) == (
        'train.py: {}: mask without an image in {} (or a gap in its NAME_0, NAME_1, ... numbering)'.format(
            mask, dataset / 'trainA'
        )
    )


def test_corrupt_image_and_mask_of_another_size(tmp_path, dataset):
    images = sorted((dataset / 'trainA').iterdir())
    for image in images:
        image.write_bytes(image.read_bytes()[:200])  # truncated
    message = error_of(tmp_path, dataroot=dataset)
    assert message.startswith('train.py: {}/'.format(dataset / 'trainA'))
    assert ': unreadable image (' in message and '\n' not in message
    for image in images:
        Image.new('RGB', (22, 33)).save(image)
    message = error_of(tmp_path, dataroot=dataset)
    assert message.startswith('train.py: {}/'.format(dataset / 'trainA_seg'))
    assert message.endswith('_0.png: mask is 220x330 (WxH) but its image is 22x33')


# The network sizes are refused as the flags are parsed (tests/test_args.py).
@pytest.mark.parametrize(
    'flags, message',
    [
        (
            ['--context', 'cudnn'],
            '--context cudnn needs nnabla-ext-cuda, which is not installed '
            '(pip install -r requirements-cuda.txt)',
        )
    ],
)
def test_bad_flags(tmp_path, flags, message):
    if '--context' in flags and cuda_installed():
        pytest.skip('nnabla-ext-cuda is installed here')
    assert error_of(tmp_path, *flags) == 'train.py: ' + message


def test_model_path_not_writable(tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('')
    assert error_of(tmp_path, '--model-save-path', str(blocker / 'models')) == (
        'train.py: --model-save-path {} is not a writable folder (Not a directory)'.format(blocker / 'models')
    )


def test_resume_without_checkpoint(tmp_path):
    assert error_of(tmp_path, '--resume') == 'train.py: --resume: no checkpoint in {}'.format(
        tmp_path / 'models'
    )


def test_command_line_error_is_one_line_without_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, 'train.py'),
            '--dataroot',
            str(tmp_path / 'none'),
            '--monitor-path',
            str(tmp_path / 'm'),
            '--model-save-path',
            str(tmp_path / 'o'),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        'train.py: {}: dataset folder not found (datasets/generate_ccp_dataset.py makes one)'.format(
            tmp_path / 'none'
        )
    )


def test_missing_c_compiler_is_one_line_before_any_work(tmp_path):
    """The CPU engine compiles cpu_kernels.c on first use; without a compiler train.py stops
    before writing anything and names the way out, which then trains."""
    build = os.path.join(ROOT, 'cpu_engine', 'build')
    before = set(os.listdir(build)) if os.path.isdir(build) else set()
    env = dict(os.environ, CC=str(tmp_path / 'no-such-cc'))
    command = (
        [sys.executable, os.path.join(ROOT, 'train.py')]
        + TINY
        + [
            '--max-epoch',
            '1',
            '--monitor-path',
            str(tmp_path / 'm'),
            '--model-save-path',
            str(tmp_path / 'o'),
            '--context',
            'cpu',
        ]
    )
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 1
    assert 'Traceback' not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith('train.py: cannot compile cpu_engine/kernels.c into ')
    assert line.endswith('install a C compiler with OpenMP (or name one in CC), or use --cpu-conv nnabla')
    assert not (tmp_path / 'm').exists() and not (tmp_path / 'o').exists()
    assert set(os.listdir(build)) == before  # no half-built library left behind
    result = subprocess.run(
        command + ['--cpu-conv', 'nnabla'], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr
