"""datasets/generate_ccp_dataset.py on a tiny CCP look-alike built in tmp_path."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

DATASETS = Path(__file__).resolve().parents[1] / 'datasets'
sys.path.insert(0, str(DATASETS))
from generate_ccp_dataset import DatasetError, generate  # noqa: E402

LABELS = ['null', 'bag', 'jeans', 'shirt', 'skirt']
JEANS, SKIRT = LABELS.index('jeans'), LABELS.index('skirt')
HEIGHT, WIDTH = 12, 8


def label_map(*regions):
    """Label map with `label` on rows [start, stop) for each (label, start, stop)."""
    labels = np.zeros((HEIGHT, WIDTH), np.uint8)
    for label, start, stop in regions:
        labels[start:stop] = label
    return labels


# photo id -> pixel-level label map, or image-level tags
PIXEL_LEVEL = {
    '0001': label_map((JEANS, 6, 12)),
    '0002': label_map((SKIRT, 5, 9), (3, 0, 5)),
    '0003': label_map((JEANS, 8, 12), (SKIRT, 4, 8)),  # both garments: goes to both domains
    '0004': label_map((1, 0, 3)),  # neither
}
IMAGE_LEVEL = {'0005': [0, 3, JEANS], '0006': [SKIRT, 1], '0007': [1, 3]}


@pytest.fixture
def ccp(tmp_path):
    root = tmp_path / 'ccp'
    for folder in ['photos', 'annotations/pixel-level', 'annotations/image-level']:
        (root / folder).mkdir(parents=True)
    scipy.io.savemat(root / 'label_list.mat', {'label_list': np.array([LABELS], dtype=object)})
    rng = np.random.RandomState(0)
    for name in [*PIXEL_LEVEL, *IMAGE_LEVEL]:
        pixels = rng.randint(0, 256, (HEIGHT, WIDTH, 3)).astype(np.uint8)
        Image.fromarray(pixels).save(root / 'photos' / f'{name}.jpg')
    for name, labels in PIXEL_LEVEL.items():
        scipy.io.savemat(root / 'annotations/pixel-level' / f'{name}.mat', {'groundtruth': labels})
    for name, tags in IMAGE_LEVEL.items():
        scipy.io.savemat(root / 'annotations/image-level' / f'{name}.mat',
                         {'tags': np.array([tags], np.uint8)})
    return root


def run_cli(*args):
    command = [sys.executable, str(DATASETS / 'generate_ccp_dataset.py'), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert 'Traceback' not in result.stderr
    message = result.stderr.strip().splitlines()[-1]  # earlier lines can only be progress bars
    assert message.startswith('generate_ccp_dataset.py: ')
    for fragment in fragments:
        assert fragment in message


def names(folder):
    return sorted(path.name for path in folder.iterdir())


def test_generates_train_and_val_folders(ccp, tmp_path):
    save_root = tmp_path / 'nested' / 'jeans2skirt'  # parent folders are created
    counts = generate(ccp, save_root, 'jeans', 'skirt')

    assert counts == {'trainA': 2, 'trainB': 2, 'valA': 1, 'valB': 1}
    assert names(save_root) == ['trainA', 'trainA_seg', 'trainB', 'trainB_seg', 'valA', 'valB']
    assert names(save_root / 'trainA') == ['0001.png', '0003.png']
    assert names(save_root / 'trainA_seg') == ['0001_0.png', '0003_0.png']
    assert names(save_root / 'trainB') == ['0002.png', '0003.png']
    assert names(save_root / 'trainB_seg') == ['0002_0.png', '0003_0.png']
    assert names(save_root / 'valA') == ['0005.png']
    assert names(save_root / 'valB') == ['0006.png']
    for domain, label in [('A', JEANS), ('B', SKIRT)]:
        for path in (save_root / f'train{domain}_seg').iterdir():
            name = path.stem[:-len('_0')]
            mask = np.asarray(Image.open(path))
            np.testing.assert_array_equal(mask, np.where(PIXEL_LEVEL[name] == label, 255, 0))
            image = Image.open(save_root / f'train{domain}' / f'{name}.png')
            photo = Image.open(ccp / 'photos' / f'{name}.jpg')
            np.testing.assert_array_equal(np.asarray(image), np.asarray(photo))
    assert names(save_root.parent) == ['jeans2skirt']  # no temporary folder left


def test_categories_are_configurable(ccp, tmp_path):
    counts = generate(ccp, tmp_path / 'out', 'bag', 'shirt', workers=1)
    assert counts == {'trainA': 1, 'trainB': 1, 'valA': 2, 'valB': 2}


def test_unknown_category_lists_valid_names(ccp, tmp_path):
    result = run_cli('--data_root', ccp, '--save_root', tmp_path / 'out', '--cat2', 'kilt')
    assert_one_line_error(result, "'kilt'", 'bag, jeans, shirt, skirt')
    assert not (tmp_path / 'out').exists()


def test_existing_output_needs_overwrite(ccp, tmp_path):
    save_root = tmp_path / 'out'
    save_root.mkdir()
    (save_root / 'old.txt').write_text('keep me')
    result = run_cli('--data_root', ccp, '--save_root', save_root)
    assert_one_line_error(result, str(save_root), '--overwrite')
    assert names(save_root) == ['old.txt']

    result = run_cli('--data_root', ccp, '--save_root', save_root, '--overwrite')
    assert result.returncode == 0, result.stderr
    assert 'trainA 2' in result.stdout
    assert 'old.txt' not in names(save_root)
    assert names(tmp_path) == ['ccp', 'out']


@pytest.mark.parametrize('broken', ['photos', 'annotations/pixel-level', 'annotations/image-level',
                                    'label_list.mat'])
def test_missing_ccp_part_is_named(ccp, tmp_path, broken):
    path = ccp / broken
    if path.is_dir():
        for child in path.iterdir():
            child.unlink()
        path.rmdir()
    else:
        path.unlink()
    result = run_cli('--data_root', ccp, '--save_root', tmp_path / 'out')
    assert_one_line_error(result, str(path), 'not found')
    assert names(tmp_path) == ['ccp']


@pytest.mark.parametrize('broken', ['label_list.mat', 'annotations/pixel-level/0002.mat',
                                    'annotations/image-level/0006.mat'])
def test_unreadable_mat_is_named_and_nothing_is_left(ccp, tmp_path, broken):
    (ccp / broken).write_bytes(b'not a mat file')
    result = run_cli('--data_root', ccp, '--save_root', tmp_path / 'out')
    assert_one_line_error(result, str(ccp / broken))
    assert names(tmp_path) == ['ccp']  # neither the output nor its staging folder


def test_failure_keeps_the_previous_dataset(ccp, tmp_path):
    save_root = tmp_path / 'out'
    generate(ccp, save_root)
    (ccp / 'photos' / '0003.jpg').write_bytes(b'\xff\xd8 truncated jpeg')
    with pytest.raises(DatasetError, match='0003.jpg'):
        generate(ccp, save_root, overwrite=True)
    assert names(save_root / 'trainA') == ['0001.png', '0003.png']
    assert names(tmp_path) == ['ccp', 'out']
