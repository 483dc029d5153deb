"""datasets/generate_ccp_dataset.py on a tiny CCP look-alike built in tmp_path."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

DATASETS = Path(__file__).resolve().parents[1] / 'datasets'
sys.path.insert(0, str(DATASETS))
import generate_ccp_dataset
from generate_ccp_dataset import MARKER, DatasetError, generate

from runtime.processes import boot_id, start_time

LABELS = ['null', 'bag', 'jeans', 'shirt', 'skirt', 'clogs']  # clogs: tags only, as in CCP
JEANS, SKIRT, CLOGS = LABELS.index('jeans'), LABELS.index('skirt'), LABELS.index('clogs')
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
IMAGE_LEVEL = {'0005': [0, 3, JEANS], '0006': [SKIRT, 1], '0007': [1, 3, CLOGS]}

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
        scipy.io.savemat(
            root / 'annotations/image-level' / f'{name}.mat', {'tags': np.array([tags], np.uint8)}
        )
    return root


@pytest.fixture
def tmp_path(tmp_path):
    return tmp_path.resolve()  # messages name resolved paths, and some systems link /tmp


@pytest.fixture
def ccp(tmp_path):
    return write_ccp(tmp_path / 'ccp', PIXEL_LEVEL, IMAGE_LEVEL)


def run_cli(*args, cwd=None):
    command = [sys.executable, str(DATASETS / 'generate_ccp_dataset.py'), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=cwd)


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert 'Traceback' not in result.stderr
    message = result.stderr.strip().splitlines()[-1]  # earlier lines can only be progress bars
    assert message.startswith('generate_ccp_dataset.py: ')
    for fragment in fragments:
        assert fragment in message


def names(folder):
    return sorted(path.name for path in folder.iterdir())


def snapshot(folder):
    """Every path under `folder` with the bytes of the files, to show that nothing changed."""
    return {
        str(path.relative_to(folder)): path.read_bytes() if path.is_file() else None
        for path in folder.rglob('*')
    }


def read_mask(path):
    return np.asarray(Image.open(path)) == 255


def test_generates_train_and_val_folders(ccp, tmp_path):
    save_root = tmp_path / 'nested' / 'jeans2skirt'  # parent folders are created
    counts = generate(ccp, save_root, 'jeans', 'skirt')

    assert counts == {'trainA': 2, 'trainB': 2, 'valA': 1, 'valB': 1}
    assert names(save_root) == [MARKER, 'trainA', 'trainA_seg', 'trainB', 'trainB_seg', 'valA', 'valB']
    assert names(save_root / 'trainA') == ['0001.png', '0003.png']
    assert names(save_root / 'trainA_seg') == ['0001_0.png', '0003_0.png']
    assert names(save_root / 'trainB') == ['0002.png', '0003.png']
    assert names(save_root / 'trainB_seg') == ['0002_0.png', '0003_0.png']
    assert names(save_root / 'valA') == ['0005.png']
    assert names(save_root / 'valB') == ['0006.png']
    for domain, label in [('A', JEANS), ('B', SKIRT)]:
        for path in (save_root / f'train{domain}_seg').iterdir():
            name = path.stem[: -len('_0')]
            mask = np.asarray(Image.open(path))
            np.testing.assert_array_equal(mask, np.where(PIXEL_LEVEL[name] == label, 255, 0))
            image = Image.open(save_root / f'train{domain}' / f'{name}.png')
            photo = Image.open(ccp / 'photos' / f'{name}.jpg')
            np.testing.assert_array_equal(np.asarray(image), np.asarray(photo))
    assert names(save_root.parent) == ['jeans2skirt']  # no temporary folder left


def test_dataset_records_its_arguments_and_counts(ccp, tmp_path):
    save_root = tmp_path / 'out'
    counts = generate(ccp, save_root, split_instances=True, min_instance_area=0.01)
    written = sorted(
        str(path.relative_to(save_root))
        for path in save_root.rglob('*')
        if path.is_file() and path.name != MARKER
    )
    assert json.loads((save_root / MARKER).read_text()) == dict(
        data_root=str(ccp),
        cat1='jeans',
        cat2='skirt',
        split_instances=True,
        min_instance_area=0.01,
        test_fraction=0.0,
        split_seed=0,
        counts=counts,
        files=written,
    )
    assert 'trainA_seg/0001_0.png' in written


def test_categories_are_configurable(ccp, tmp_path):
    counts = generate(ccp, tmp_path / 'out', 'bag', 'shirt', workers=1)
    assert counts == {'trainA': 1, 'trainB': 1, 'valA': 2, 'valB': 2}


def test_unknown_category_lists_valid_names(ccp, tmp_path):
    result = run_cli('--data_root', ccp, '--save_root', tmp_path / 'out', '--cat2', 'kilt')
    assert_one_line_error(
        result, "--cat2 'kilt': unknown category", 'valid categories: bag, clogs, jeans, shirt, skirt'
    )
    assert not (tmp_path / 'out').exists()


def test_overwrite_replaces_a_dataset_of_this_script(ccp, tmp_path):
    save_root = tmp_path / 'out'
    generate(ccp, save_root, 'bag', 'shirt')
    before = snapshot(save_root)
    result = run_cli('--data_root', ccp, '--save_root', save_root)
    assert_one_line_error(result, f'--save_root {save_root}: already exists', '--overwrite')
    assert snapshot(save_root) == before

    result = run_cli('--data_root', ccp, '--save_root', save_root, '--overwrite')
    assert result.returncode == 0, result.stderr
    assert 'trainA 2, trainB 2, valA 1, valB 1' in result.stdout
    assert json.loads((save_root / MARKER).read_text())['cat1'] == 'jeans'
    assert names(save_root / 'trainA') == ['0001.png', '0003.png']  # no bag photo left
    assert names(tmp_path) == ['ccp', 'out']


@pytest.mark.parametrize('overwrite', [[], ['--overwrite']])
def test_folder_without_marker_is_never_replaced(ccp, tmp_path, overwrite):
    save_root = tmp_path / 'out'
    (save_root / 'trainA').mkdir(parents=True)  # looks like a dataset, but has no marker
    (save_root / 'trainA' / 'mine.png').write_bytes(b'keep me')
    result = run_cli('--data_root', ccp, '--save_root', save_root, *overwrite)
    assert_one_line_error(result, f'--save_root {save_root}: exists and has no {MARKER}')
    assert snapshot(save_root) == {'trainA': None, 'trainA/mine.png': b'keep me'}
    assert names(tmp_path) == ['ccp', 'out']


def test_overwrite_refuses_a_dataset_holding_other_files(ccp, tmp_path):
    save_root = tmp_path / 'out'
    generate(ccp, save_root)
    (save_root / 'translated').mkdir()
    (save_root / 'notes.txt').write_text('keep me')
    before = snapshot(save_root)
    result = run_cli('--data_root', ccp, '--save_root', save_root, '--overwrite')
    assert_one_line_error(
        result,
        f'--save_root {save_root}: holds {save_root / "notes.txt"} and '
        '1 more, which this script did not write',
    )
    assert snapshot(save_root) == before


@pytest.mark.parametrize(
    'added',
    [
        'trainA/mine.png',
        'trainA_seg/mine_0.png',
        'valA/edits/a.png',
        'trainB_seg/old/',
        'notes.txt',
        'trainA/link.png@',
    ],
)
def test_overwrite_refuses_anything_it_did_not_write_anywhere_in_the_tree(ccp, tmp_path, added):
    """Files, folders (even empty) and links the user put inside the script's own folders."""
    save_root = tmp_path / 'out'
    generate(ccp, save_root)
    path = save_root / added.rstrip('/@')
    if added.endswith('/'):
        path.mkdir()
    elif added.endswith('@'):
        path.symlink_to(save_root / 'trainA' / '0001.png')
    else:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b'keep me')
    first = save_root / added.split('/')[0] / 'edits' if 'edits' in added else path
    before = snapshot(save_root)
    result = run_cli('--data_root', ccp, '--save_root', save_root, '--overwrite')
    assert_one_line_error(
        result,
        f'--save_root {save_root}: holds {first}, which this script '
        'did not write; move it out before using --overwrite',
    )
    assert snapshot(save_root) == before
    if first.is_dir() and not first.is_symlink():
        shutil.rmtree(first)
    else:
        first.unlink()
    assert run_cli('--data_root', ccp, '--save_root', save_root, '--overwrite').returncode == 0


@pytest.mark.parametrize(
    'marker, reason',
    [
        ({'cat1': 'jeans'}, 'does not list the files this script wrote (an earlier version made it)'),
        ('{"files": ', f'{MARKER} is unreadable (JSONDecodeError'),
        ({'files': 'trainA/0001.png'}, f'{MARKER} is unreadable (TypeError: files is not a list'),
    ],
)
def test_overwrite_refuses_a_marker_without_a_readable_file_list(ccp, tmp_path, marker, reason):
    save_root = tmp_path / 'out'
    generate(ccp, save_root)
    (save_root / MARKER).write_text(marker if isinstance(marker, str) else json.dumps(marker))
    before = snapshot(save_root)
    result = run_cli('--data_root', ccp, '--save_root', save_root, '--overwrite')
    assert_one_line_error(result, f'--save_root {save_root}: ', reason)
    assert snapshot(save_root) == before


@pytest.mark.parametrize('save_root', ['file', 'file/out'])
def test_save_root_through_a_file_is_refused(ccp, tmp_path, save_root):
    (tmp_path / 'file').write_text('keep me')
    result = run_cli('--data_root', ccp, '--save_root', tmp_path / save_root, '--overwrite')
    assert_one_line_error(result, f'{tmp_path / "file"} exists and is not a folder')
    assert (tmp_path / 'file').read_text() == 'keep me'
    assert names(tmp_path) == ['ccp', 'file']


# save_root relative to tmp_path, which holds the CCP copy at tmp_path/parent/ccp
OVERLAPS = [
    ('parent/ccp', 'is'),
    ('parent/ccp/../ccp', 'is'),
    ('link_to_ccp', 'is'),
    ('parent', 'contains'),
    ('.', 'contains'),
    ('parent/ccp/photos', 'lies inside'),
    ('parent/ccp/new', 'lies inside'),
    ('link_to_ccp/new', 'lies inside'),
]


@pytest.mark.parametrize('save_root, relation', OVERLAPS)
@pytest.mark.parametrize('overwrite', [[], ['--overwrite']])
def test_save_root_overlapping_data_root_is_refused(tmp_path, save_root, relation, overwrite):
    ccp = write_ccp(tmp_path / 'parent' / 'ccp', PIXEL_LEVEL, IMAGE_LEVEL)
    (tmp_path / 'parent' / 'unrelated.txt').write_text('keep me')
    (tmp_path / 'link_to_ccp').symlink_to(ccp)
    before = snapshot(tmp_path)
    result = run_cli('--data_root', ccp, '--save_root', save_root, *overwrite, cwd=tmp_path)
    assert_one_line_error(result, f'{relation} --data_root {ccp}')
    assert snapshot(tmp_path) == before


def test_data_root_inside_a_dataset_of_this_script_is_refused(ccp, tmp_path):
    save_root = tmp_path / 'out'
    generate(ccp, save_root)
    moved = save_root / 'ccp'
    ccp.rename(moved)
    before = snapshot(tmp_path)
    result = run_cli('--data_root', moved, '--save_root', save_root, '--overwrite')
    assert_one_line_error(result, f'--save_root {save_root} contains --data_root {moved}')
    assert snapshot(tmp_path) == before


def test_dataset_appearing_during_the_run_is_not_replaced(ccp, tmp_path, monkeypatch):
    save_root = tmp_path / 'out'
    run_export = generate_ccp_dataset.run_export

    def run_export_while_someone_writes(*args):
        save_root.mkdir(exist_ok=True)
        (save_root / 'theirs.txt').write_text('keep me')
        return run_export(*args)

    monkeypatch.setattr(generate_ccp_dataset, 'run_export', run_export_while_someone_writes)
    with pytest.raises(DatasetError, match=re.escape(f'{save_root}: exists and has no')):
        generate(ccp, save_root)
    assert snapshot(save_root) == {'theirs.txt': b'keep me'}
    assert names(tmp_path) == ['ccp', 'out']


@pytest.mark.parametrize(
    'flag, category, options, where',
    [
        ('--cat1', 'clogs', [], ''),
        ('--cat2', 'clogs', [], ''),
        # bag is only in 0004, on 24 of its 96 pixels
        (
            '--cat1',
            'bag',
            ['--split-instances', '--min-instance-area', '0.3'],
            ' in a region of at least --min-instance-area 0.3',
        ),
    ],
)
def test_category_without_pixel_level_photos_is_refused(ccp, tmp_path, flag, category, options, where):
    result = run_cli('--data_root', ccp, '--save_root', tmp_path / 'out', flag, category, *options)
    domain = 'A' if flag == '--cat1' else 'B'
    assert_one_line_error(
        result,
        f"{flag} '{category}': no pixel-level annotation contains "
        f'it{where}, so train{domain} would be empty; categories with '
        'pixel-level photos: bag, jeans, shirt, skirt',
    )
    assert names(tmp_path) == ['ccp']


def test_os_error_is_one_line(ccp, tmp_path):
    result = run_cli('--data_root', ccp, '--save_root', tmp_path / ('x' * 300))
    assert_one_line_error(result, 'File name too long')
    assert names(tmp_path) == ['ccp']


def test_ctrl_c_is_one_line_and_leaves_nothing(ccp, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate_ccp_dataset, 'run_export', interrupted)
    monkeypatch.setattr(
        sys,
        'argv',
        ['generate_ccp_dataset.py', '--data_root', str(ccp), '--save_root', str(tmp_path / 'out')],
    )
    try:
        with pytest.raises(
            SystemExit, match='^generate_ccp_dataset.py: stopped by Ctrl-C; nothing was written$'
        ):
            generate_ccp_dataset.main()
    except KeyboardInterrupt:  # would otherwise end the whole test session
        pytest.fail('Ctrl-C left main() as a traceback')
    assert names(tmp_path) == ['ccp']  # neither the output nor its staging folder


@pytest.mark.parametrize(
    'broken', ['photos', 'annotations/pixel-level', 'annotations/image-level', 'label_list.mat']
)
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


@pytest.mark.parametrize(
    'broken', ['label_list.mat', 'annotations/pixel-level/0002.mat', 'annotations/image-level/0006.mat']
)
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
    result = run_cli(
        '--data_root', ccp, '--save_root', save_root, '--split-instances', '--min-instance-area', 0.05
    )
    assert result.returncode == 0, result.stderr
    assert 'trainA 2, trainB 1' in result.stdout

    assert names(save_root / 'trainA') == ['0001.png', '0002.png']  # 0003 has no blob left
    assert names(save_root / 'trainA_seg') == ['0001_0.png', '0001_1.png', '0002_0.png']
    for index, box in enumerate(TWO_BLOBS):  # in scan order, without the speck
        np.testing.assert_array_equal(
            read_mask(save_root / 'trainA_seg' / f'0001_{index}.png'), label_map((JEANS, *box)) == JEANS
        )
    np.testing.assert_array_equal(
        read_mask(save_root / 'trainA_seg' / '0002_0.png'), SPLIT_PIXEL_LEVEL['0002'] == JEANS
    )
    assert names(save_root / 'trainB_seg') == ['0004_0.png']


def test_without_split_each_region_stays_one_mask(tmp_path):
    save_root = tmp_path / 'out'
    counts = generate(write_ccp(tmp_path / 'ccp', SPLIT_PIXEL_LEVEL, {}), save_root)
    assert counts == {'trainA': 3, 'trainB': 1, 'valA': 0, 'valB': 0}
    for name in ['0001', '0002', '0003']:
        np.testing.assert_array_equal(
            read_mask(save_root / 'trainA_seg' / f'{name}_0.png'), SPLIT_PIXEL_LEVEL[name] == JEANS
        )
    assert names(save_root / 'trainA_seg') == ['0001_0.png', '0002_0.png', '0003_0.png']


# For --test-fraction: jeans in 0001-0006 and a skirt in 0005-0015, so 0005 and 0006 have both
SPLIT_LEVEL = {
    f'{index:04d}': label_map(
        *[
            (label, top, top + 4)
            for label, top, first, last in [(JEANS, 0, 1, 6), (SKIRT, 6, 5, 15)]
            if first <= index <= last
        ]
    )
    for index in range(1, 16)
}
SPLIT_COUNTS = {'A': 6, 'B': 11}
PHOTO_FOLDERS = [
    'testA',
    'testA_seg',
    'testB',
    'testB_seg',
    'trainA',
    'trainA_seg',
    'trainB',
    'trainB_seg',
    'valA',
    'valB',
]


@pytest.fixture
def split_ccp(tmp_path):
    return write_ccp(tmp_path / 'ccp', SPLIT_LEVEL, IMAGE_LEVEL)


def listing(save_root):
    return {folder: names(save_root / folder) for folder in PHOTO_FOLDERS}


def test_split_layout_counts_and_disjointness(split_ccp, tmp_path):
    save_root = tmp_path / 'out'
    counts = generate(split_ccp, save_root, test_fraction=0.3, split_seed=3)
    # round(0.3 * 6) = 2 of the jeans photos, round(0.3 * 11) = 3 of the skirt photos
    assert counts == {'trainA': 4, 'trainB': 8, 'testA': 2, 'testB': 3, 'valA': 1, 'valB': 1}
    assert names(save_root) == [MARKER] + PHOTO_FOLDERS
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
    result = run_cli(
        '--data_root', split_ccp, '--save_root', tmp_path / 'out', '--test-fraction', 0.3, '--split-seed', 3
    )
    assert result.returncode == 0, result.stderr
    assert 'trainA 4, trainB 8, testA 2, testB 3, valA 1, valB 1' in result.stdout

    counts = generate(split_ccp, tmp_path / 'plain')
    assert counts == {'trainA': 6, 'trainB': 11, 'valA': 1, 'valB': 1}
    assert names(tmp_path / 'plain') == [MARKER] + PHOTO_FOLDERS[4:]


# Values every flag must refuse, run with --data_root ccp --save_root out in tmp_path. Flags
# without a value get one; the path flags get folders that overlap or are not CCP.
BAD_VALUES = {
    '--data_root': ['', '0', '-1', 'missing', 'ccp/photos'],
    '--save_root': ['', '0/..', '.', 'ccp', 'ccp/photos'],
    '--cat1': ['', '0', '-1', 'kilt', 'clogs', 'skirt'],
    '--cat2': ['', '0', '-1', 'kilt', 'clogs', 'jeans'],
    '--overwrite': ['0'],
    '--workers': ['0', '-1', str((os.cpu_count() or 1) + 1), '1.5', 'x', ''],
    '--split-instances': ['0'],
    '--min-instance-area': ['-0.1', '1', '1.5', 'nan', 'inf', '-inf', 'x', ''],
    '--test-fraction': ['-0.1', '1', '1.5', 'nan', 'inf', '-inf', 'x', ''],
    '--split-seed': ['-1', str(2**32), '0.5', 'x', ''],
}
# Whether these are usable depends on the CCP copy; every other flag is checked by argparse.
CHECKED_AGAINST_THE_DATA = {'--data_root', '--save_root', '--cat1', '--cat2'}


def test_bad_values_cover_every_flag():
    result = run_cli('--help')
    assert result.returncode == 0, result.stderr
    flags = set(re.findall(r'(?<![\w-])--[a-zA-Z][\w-]*', result.stdout)) - {'--help'}
    assert flags == set(BAD_VALUES)


@pytest.mark.parametrize(
    'flag, value', [(flag, value) for flag, values in BAD_VALUES.items() for value in values]
)
def test_every_bad_flag_value_is_refused_in_one_line(ccp, tmp_path, flag, value):
    before = snapshot(tmp_path)
    result = run_cli('--data_root', 'ccp', '--save_root', 'out', f'{flag}={value}', cwd=tmp_path)
    assert_one_line_error(result)
    if flag not in CHECKED_AGAINST_THE_DATA:  # argparse's usage error, naming the flag
        assert result.returncode == 2
        assert result.stderr.startswith('usage: ')
        assert f'error: argument {flag}' in result.stderr
    assert snapshot(tmp_path) == before


# The generator with every pixel-level export slowed down, so that a signal finds it writing.
SLOW = """
import sys, time
sys.path.insert(0, {datasets!r})
import generate_ccp_dataset as g
real = g.export_pixel_level
def slow(*args, **kwargs):
    time.sleep(0.5)
    return real(*args, **kwargs)
g.export_pixel_level = slow
sys.argv = ['generate_ccp_dataset.py'] + {argv!r}
g.main()
"""


def start_slow(ccp, save_root):
    script = SLOW.format(
        datasets=str(DATASETS), argv=['--data_root', str(ccp), '--save_root', str(save_root)]
    )
    # A session of its own: its process group is its alone, as a shell job's would be.
    return subprocess.Popen(
        [sys.executable, '-c', script], stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def staging_folders(save_root):
    return sorted(save_root.parent.glob(f'.{save_root.name}.*'))


def wait_for_a_photo_in_staging(process, save_root):
    deadline = time.time() + 60
    while not any(
        (staging / save_root.name / 'trainA').glob('*.png') for staging in staging_folders(save_root)
    ):
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.02)


def ended_process():
    finished = subprocess.Popen(['true'])
    finished.wait()
    return finished.pid


def owner_record(**changes):
    return json.dumps(
        {
            'pid': os.getpid(),
            'host': socket.gethostname(),
            'boot_id': boot_id(),
            'start_time': start_time(os.getpid()),
            **changes,
        }
    )


def test_sigterm_to_the_process_group_ends_in_one_line_and_leaves_nothing(ccp, tmp_path):
    save_root = tmp_path / 'out'
    process = start_slow(ccp, save_root)
    wait_for_a_photo_in_staging(process, save_root)
    os.killpg(process.pid, signal.SIGTERM)
    try:
        _, stderr = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail('the pool waited forever for a worker killed by the signal')
    assert process.returncode == 1
    assert 'Traceback' not in stderr and 'Directory not empty' not in stderr
    assert stderr.strip().splitlines()[-1] == 'generate_ccp_dataset.py: terminated'
    assert names(tmp_path) == ['ccp']


def test_kill_9_leaves_a_staging_folder_that_the_next_run_removes(ccp, tmp_path, capsys):
    save_root = tmp_path / 'out'
    process = start_slow(ccp, save_root)
    wait_for_a_photo_in_staging(process, save_root)
    process.kill()
    process.communicate(timeout=60)
    [staging] = staging_folders(save_root)
    time.sleep(0.5)
    before = snapshot(staging)
    time.sleep(1.5)  # the three photos left take an orphaned worker 1.5 s
    assert snapshot(staging) == before, 'the workers outlived the main process'
    generate(ccp, save_root)
    assert names(tmp_path) == ['ccp', 'out']
    assert capsys.readouterr().err.splitlines()[0] == (
        f'generate_ccp_dataset.py: removed {staging}, the staging folder of an interrupted run '
        f'(pid {process.pid}: no process has that pid now)'
    )


@pytest.mark.parametrize(
    'owner',
    [
        None,  # not (yet) named: a run that has just made it, or not this script's
        owner_record(),  # a process that runs
        owner_record(host='elsewhere', pid=1),  # another machine's: cannot be seen from here
    ],
)
def test_a_staging_folder_of_a_live_or_unknown_process_is_left_alone(ccp, tmp_path, owner):
    staging = tmp_path / '.out.abc123'
    (staging / 'out' / 'trainA').mkdir(parents=True)
    if owner:
        (staging / 'staging.json').write_text(owner)
    before = snapshot(staging)
    generate(ccp, tmp_path / 'out')
    assert snapshot(staging) == before


@pytest.mark.parametrize('owner', [{'pid': 'ended'}, {'boot_id': 'an earlier boot'}, {'start_time': 1}])
def test_a_staging_folder_of_an_ended_process_is_removed(ccp, tmp_path, owner):
    """Gone: no such pid; a pid of an earlier boot; a pid now used by another process."""
    if owner.get('pid') == 'ended':
        owner['pid'] = ended_process()
    staging = tmp_path / '.out.abc123'
    (staging / 'out' / 'trainA').mkdir(parents=True)
    (staging / 'staging.json').write_text(owner_record(**owner))
    generate(ccp, tmp_path / 'out')
    assert names(tmp_path) == ['ccp', 'out']


def test_a_dataset_moved_aside_by_a_killed_run_is_restored(ccp, tmp_path, capsys):
    save_root = tmp_path / 'out'
    generate(ccp, save_root, 'bag', 'shirt')
    staging = tmp_path / '.out.abc123'
    staging.mkdir()
    save_root.rename(staging / 'replaced')  # killed between its two renames
    (staging / 'staging.json').write_text(owner_record(pid=ended_process()))
    with pytest.raises(DatasetError, match='already exists; pass --overwrite'):
        generate(ccp, save_root)
    assert json.loads((save_root / MARKER).read_text())['cat1'] == 'bag'
    assert names(tmp_path) == ['ccp', 'out']
    assert f'restored {save_root} from {staging}' in capsys.readouterr().err
