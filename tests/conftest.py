import os
import shutil
import sys

import nnabla as nn
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, 'datasets', 'ccp_sample')
sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def fresh_parameters():
    """Each test builds its networks from an empty parameter store."""
    nn.clear_parameters()
    yield
    nn.clear_parameters()


@pytest.fixture(scope='module')
def two_images(tmp_path_factory):
    """The first two images of each domain of the bundled sample, with their masks."""
    root = tmp_path_factory.mktemp('two_images')
    for letter in 'AB':
        images = sorted(os.listdir(os.path.join(SAMPLE, f'train{letter}')))[:2]
        for folder in [f'train{letter}', f'train{letter}_seg']:
            os.makedirs(root / folder)
        for image in images:
            shutil.copy(os.path.join(SAMPLE, f'train{letter}', image), root / f'train{letter}')
            stem = os.path.splitext(image)[0]
            for mask in os.listdir(os.path.join(SAMPLE, f'train{letter}_seg')):
                if mask.startswith(stem + '_'):
                    shutil.copy(os.path.join(SAMPLE, f'train{letter}_seg', mask), root / f'train{letter}_seg')
    return root


@pytest.fixture(scope='module')
def two_epochs(tmp_path_factory, two_images):
    """A finished run of two epochs on two_images, with checkpoints at iterations 2 and 4."""
    from test_checkpoints import run_in

    folder = tmp_path_factory.mktemp('two_epochs')
    run_in(folder, two_images, '--max-epoch', '2')
    return folder


@pytest.fixture
def dataset(tmp_path):
    """A writable copy of the bundled sample."""
    root = tmp_path / 'data'
    for folder in ['trainA', 'trainA_seg', 'trainB', 'trainB_seg']:
        shutil.copytree(os.path.join(SAMPLE, folder), root / folder)
    return root
