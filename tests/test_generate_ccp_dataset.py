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
    """Label map with `label` on rows [top, bottom) and columns [left, right), all columns if
    left and right are omitted, for each (label, top, bottom[, left, right])."""
    labels = np.zeros((HEIGHT, WIDTH), np.uint8)
    for label, top, bottom, *columns in regions:
        left, right = columns or (0, WIDTH)
        labels[top:bottom, left:right] = label
    return labels


# photo id -> pixel-level label map, or image-level tags
PIXEL_LEVEL = {
    '0001': label_map((JEANS, 6, 12)),
    '0002': label_map((SKIRT, 5, 9), (3, 0, 5)),
    '0003': label_map((JEANS, 8, 12), (SKIRT, 4, 8)),  # both garments: goes to both domains
    '0004': label_map((1, 0, 3)),  # neither
}
IMAGE_LEVEL = {'0005': [0, 3, JEANS], '0006': [SKIRT, 1], '0007': [1, 3]}

# For --split-instances with --min-instance-area 0.05, i.e. components of 5 of the 96 pixels
TWO_BLOBS = [(0, 3, 0, 3), (6, 9, 4, 8)]  # (top, bottom, left, right)
SPLIT_PIXEL_LEVEL = {
    '0001': label_map(*[(JEANS, *box) for box in TWO_BLOBS], (JEANS, 11, 12, 0, 1)),  # + a speck
    '0002': label_map((JEANS, 0, 3, 0, 3), (JEANS, 3, 6, 3, 6)),  # touch at a corner: one blob
    '0003': label_map((JEANS, 0, 2, 0, 2)),  # 4 pixels only
    '0004': label_map((SKIRT, 4, 8)),
}


def write_ccp(root, pixel_level, image_level):
    """A CCP look-alike with random photos for the given label maps and tags."""
    for folder in ['photos', 'annotations/pixel-level', 'annotations/image-level']:
        (root / folder).mkdir(parents=True)
    scipy.io.savemat(root / 'label_list.mat', {'label_list': np.array([LABELS], dtype=object)})
    rng = np.random.RandomState(0)
    for name in [*pixel_level, *image_level]:
        pixels = rng.randint(0, 256, (HEIGHT, WIDTH, 3)).astype(np.uint8)
        Image.fromarray(pixels).save(root / 'photos' / f'{name}.jpg')
    for name, labels in pixel_level.items():
        scipy.io.savemat(root / 'annotations/pixel-level' / f'{name}.mat', {'groundtruth': labels})
    for name, tags in image_level.items():
        scipy.io.savemat(root / 'annotations/image-level' / f'{name}.mat',
                         {'tags': np.array([tags], np.uint8)})
    return root


@pytest.fixture
def ccp(tmp_path):
    return write_ccp(tmp_path / 'ccp', PIXEL_LEVEL, IMAGE_LEVEL)


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


def read_mask(path):
    return np.asarray(Image.open(path)) == 255


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


def test_split_instances_writes_one_mask_per_component(tmp_path):
    ccp = write_ccp(tmp_path / 'ccp', SPLIT_PIXEL_LEVEL, {})
    save_root = tmp_path / 'out'
    result = run_cli('--data_root', ccp, '--save_root', save_root, '--split-instances',
                     '--min-instance-area', 0.05)
    assert result.returncode == 0, result.stderr
    assert 'trainA 2, trainB 1' in result.stdout

    assert names(save_root / 'trainA') == ['0001.png', '0002.png']  # 0003 has no blob left
    assert names(save_root / 'trainA_seg') == ['0001_0.png', '0001_1.png', '0002_0.png']
    for index, box in enumerate(TWO_BLOBS):  # in scan order, without the speck
        np.testing.assert_array_equal(read_mask(save_root / 'trainA_seg' / f'0001_{index}.png'),
                                      label_map((JEANS, *box)) == JEANS)
    np.testing.assert_array_equal(read_mask(save_root / 'trainA_seg' / '0002_0.png'),
                                  SPLIT_PIXEL_LEVEL['0002'] == JEANS)
    assert names(save_root / 'trainB_seg') == ['0004_0.png']


def test_without_split_each_region_stays_one_mask(tmp_path):
    save_root = tmp_path / 'out'
    counts = generate(write_ccp(tmp_path / 'ccp', SPLIT_PIXEL_LEVEL, {}), save_root)
    assert counts == {'trainA': 3, 'trainB': 1, 'valA': 0, 'valB': 0}
    for name in ['0001', '0002', '0003']:
        np.testing.assert_array_equal(read_mask(save_root / 'trainA_seg' / f'{name}_0.png'),
                                      SPLIT_PIXEL_LEVEL[name] == JEANS)
    assert names(save_root / 'trainA_seg') == ['0001_0.png', '0002_0.png', '0003_0.png']


@pytest.mark.parametrize('area', ['-0.1', '1.0'])
def test_min_instance_area_must_be_a_fraction(ccp, tmp_path, area):
    result = run_cli('--data_root', ccp, '--save_root', tmp_path / 'out', '--split-instances',
                     '--min-instance-area', area)
    assert_one_line_error(result, 'min_instance_area', area)
    assert names(tmp_path) == ['ccp']


# For --test-fraction: jeans in 0001-0006 and a skirt in 0005-0015, so 0005 and 0006 have both
SPLIT_LEVEL = {f'{index:04d}': label_map(*[(label, top, top + 4) for label, top, first, last
                                           in [(JEANS, 0, 1, 6), (SKIRT, 6, 5, 15)]
                                           if first <= index <= last])
               for index in range(1, 16)}
SPLIT_COUNTS = {'A': 6, 'B': 11}
PHOTO_FOLDERS = ['testA', 'testA_seg', 'testB', 'testB_seg',
                 'trainA', 'trainA_seg', 'trainB', 'trainB_seg', 'valA', 'valB']


@pytest.fixture
def split_ccp(tmp_path):
    return write_ccp(tmp_path / 'ccp', SPLIT_LEVEL, IMAGE_LEVEL)


def listing(save_root):
    return {folder: names(save_root / folder) for folder in names(save_root)}


def test_split_layout_counts_and_disjointness(split_ccp, tmp_path):
    save_root = tmp_path / 'out'
    counts = generate(split_ccp, save_root, test_fraction=0.3, split_seed=3)
    # round(0.3 * 6) = 2 of the jeans photos, round(0.3 * 11) = 3 of the skirt photos
    assert counts == {'trainA': 4, 'trainB': 8, 'testA': 2, 'testB': 3, 'valA': 1, 'valB': 1}
    assert names(save_root) == PHOTO_FOLDERS
    for domain, label in [('A', JEANS), ('B', SKIRT)]:
        test = {name[:-4] for name in names(save_root / f'test{domain}')}
        train = {name[:-4] for name in names(save_root / f'train{domain}')}
        assert not test & train
        assert len(test | train) == SPLIT_COUNTS[domain]
        for split, photos in [('test', test), ('train', train)]:  # masks beside their photos
            assert names(save_root / f'{split}{domain}_seg') == sorted(f'{n}_0.png' for n in photos)
        for name in test:
            mask = read_mask(save_root / f'test{domain}_seg' / f'{name}_0.png')
            np.testing.assert_array_equal(mask, SPLIT_LEVEL[name] == label)


def test_split_is_reproducible_and_follows_the_seed(split_ccp, tmp_path):
    runs = []
    for run, seed in enumerate([3, 3, 4]):
        generate(split_ccp, tmp_path / f'out{run}', test_fraction=0.3, split_seed=seed, workers=2)
        runs.append(listing(tmp_path / f'out{run}'))
    assert runs[0] == runs[1]  # every folder, masks included
    assert (runs[0]['testA'], runs[0]['testB']) != (runs[2]['testA'], runs[2]['testB'])


def test_split_keeps_at_least_one_photo_on_each_side(split_ccp, tmp_path):
    counts = generate(split_ccp, tmp_path / 'small', test_fraction=0.01)
    assert (counts['testA'], counts['testB']) == (1, 1)
    counts = generate(split_ccp, tmp_path / 'large', test_fraction=0.99)
    assert (counts['trainA'], counts['trainB']) == (1, 1)


def test_split_cli_prints_test_counts_and_no_fraction_makes_no_test_folders(split_ccp, tmp_path):
    result = run_cli('--data_root', split_ccp, '--save_root', tmp_path / 'out',
                     '--test-fraction', 0.3, '--split-seed', 3)
    assert result.returncode == 0, result.stderr
    assert 'trainA 4, trainB 8, testA 2, testB 3, valA 1, valB 1' in result.stdout

    counts = generate(split_ccp, tmp_path / 'plain')
    assert counts == {'trainA': 6, 'trainB': 11, 'valA': 1, 'valB': 1}
    assert names(tmp_path / 'plain') == PHOTO_FOLDERS[4:]


@pytest.mark.parametrize('option, value', [('--test-fraction', '1'), ('--test-fraction', '-0.1'),
                                           ('--test-fraction', 'x'), ('--test-fraction', 'nan'),
                                           ('--split-seed', '-1'), ('--split-seed', '0.5')])
def test_bad_split_option_is_a_usage_error(ccp, tmp_path, option, value):
    result = run_cli('--data_root', ccp, '--save_root', tmp_path / 'out', option, value)
    assert result.returncode == 2  # argparse's usage error
    assert result.stderr.startswith('usage: ')
    assert_one_line_error(result, f'error: argument {option}: ', value)
    assert names(tmp_path) == ['ccp']
