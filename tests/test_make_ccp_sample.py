"""datasets/make_ccp_sample.py on a tiny generated dataset built in tmp_path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

DATASETS = Path(__file__).resolve().parents[1] / 'datasets'
sys.path.insert(0, str(DATASETS))
import make_ccp_sample
from make_ccp_sample import FOLDERS, MARKER, STAGING_PREFIX, SampleError, make_sample

from runtime.processes import OWNER_FILE, this_process

HEIGHT, WIDTH = 33, 22  # a tenth of the load size, 330x220


def write_dataset(root, mask_values=(0, 255)):
    """A generate_ccp_dataset.py look-alike: three training photos per domain, the first with
    two instances, and two validation photos; one photo of each domain shows both."""
    rng = np.random.RandomState(0)
    photos = {'trainA': ['0001', '0002', '0003'], 'trainB': ['0003', '0004', '0005']}
    photos |= {'valA': ['0010', '0011'], 'valB': ['0012', '0013']}
    for folder, names in photos.items():
        (root / folder).mkdir(parents=True)
        if folder.startswith('train'):
            (root / f'{folder}_seg').mkdir()
        for index, name in enumerate(names):
            pixels = rng.randint(0, 256, (HEIGHT, WIDTH, 3)).astype(np.uint8)
            Image.fromarray(pixels).save(root / folder / f'{name}.png')
            if folder.startswith('train'):
                boxes = [(0, 15, 0, 10), (20, 30, 12, 22)][: 2 if index == 0 else 1]
                for number, (top, bottom, left, right) in enumerate(boxes):
                    mask = np.full((HEIGHT, WIDTH), mask_values[0], np.uint8)
                    mask[top:bottom, left:right] = mask_values[1]
                    Image.fromarray(mask).save(root / f'{folder}_seg' / f'{name}_{number}.png')
    return root


@pytest.fixture
def tmp_path(tmp_path):
    return tmp_path.resolve()


@pytest.fixture
def dataset(tmp_path):
    return write_dataset(tmp_path / 'generated')


def files_under(folder):
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob('*') if path.is_file())


def snapshot(folder):
    """Every path under `folder` with the bytes of the files, to show that nothing changed."""
    return {
        path.relative_to(folder).as_posix(): path.read_bytes() if path.is_file() else None
        for path in folder.rglob('*')
    }


def listed(save_root):
    return json.loads((save_root / MARKER).read_text())['files']


def test_makes_a_sample_at_load_size_and_lists_its_files(dataset, tmp_path):
    save_root = tmp_path / 'sample'
    make_sample(dataset, save_root, train_count=2, val_count=1)
    images = [path for path in files_under(save_root) if path != MARKER]
    assert images == [
        'trainA/0001.png',
        'trainA/0002.png',
        'trainA_seg/0001_0.png',
        'trainA_seg/0001_1.png',
        'trainA_seg/0002_0.png',
        'trainB/0004.png',
        'trainB/0005.png',
        'trainB_seg/0004_0.png',
        'trainB_seg/0005_0.png',
        'valA/0010.png',
        'valB/0012.png',
    ]  # 0003 shows both; the photo with two instances comes first
    assert listed(save_root) == images
    for path in images:
        with Image.open(save_root / path) as image:
            assert image.size == (220, 330) and image.mode == ('L' if '_seg' in path else 'RGB')
    mask = np.asarray(Image.open(save_root / 'trainA_seg/0001_1.png'))
    assert set(np.unique(mask)) == {0, 255}
    inside = np.zeros(mask.shape, bool)
    inside[200:300, 120:220] = True  # box (20, 30, 12, 22), scaled ten times, corners rounded
    assert (mask[~inside] == 0).all() and (mask[205:295, 125:215] == 255).all()


def test_masks_and_photos_are_read_by_the_project_reader(tmp_path):
    """0/1 masks read as data.load_mask reads them (as 0/255 ones), not as empty."""
    one = write_dataset(tmp_path / 'one', mask_values=(0, 1))
    full = write_dataset(tmp_path / 'full')
    make_sample(one, tmp_path / 'from_one', train_count=2, val_count=1)
    make_sample(full, tmp_path / 'from_full', train_count=2, val_count=1)
    assert snapshot(tmp_path / 'from_one') == snapshot(tmp_path / 'from_full')


def test_the_bundled_sample_is_made_again_byte_for_byte(tmp_path):
    """The sample's own photos are at load size already: cutting it again changes nothing, the
    same as the Pillow code this script used before reproduced it."""
    sample = DATASETS / 'ccp_sample'
    make_sample(sample, tmp_path / 'again')
    for folder in FOLDERS:
        again = snapshot(tmp_path / 'again' / folder)
        assert again == snapshot(sample / folder), folder


@pytest.mark.parametrize('sample', ['ccp_sample', 'ccp_multi_sample'])
def test_the_bundled_samples_list_their_files_so_they_can_be_made_again(sample):
    root = DATASETS / sample
    on_disk = [path for path in files_under(root) if path.split('/')[0] in FOLDERS]
    assert listed(root) == on_disk
    make_ccp_sample.check_save_root(root)  # a regeneration would be allowed


def test_a_rerun_replaces_its_own_output_and_keeps_the_rest(dataset, tmp_path):
    save_root = tmp_path / 'sample'
    make_sample(dataset, save_root, train_count=2, val_count=2)
    (save_root / 'LICENSE').write_text('licence')
    (save_root / 'NOTICE.md').write_text('notice')
    make_sample(dataset, save_root, train_count=1, val_count=1)
    assert files_under(save_root) == [
        MARKER,
        'LICENSE',
        'NOTICE.md',
        'trainA/0001.png',
        'trainA_seg/0001_0.png',
        'trainA_seg/0001_1.png',
        'trainB/0004.png',
        'trainB_seg/0004_0.png',
        'valA/0010.png',
        'valB/0012.png',
    ]  # no staging folder or partial marker is left either
    assert listed(save_root) == files_under(save_root)[3:]
    assert sorted(os.listdir(save_root)) == sorted([MARKER, 'LICENSE', 'NOTICE.md', *FOLDERS])


def test_an_empty_folder_without_a_marker_is_used(dataset, tmp_path):
    save_root = tmp_path / 'sample'
    (save_root / 'trainA').mkdir(parents=True)
    (save_root / 'LICENSE').write_text('licence')
    make_sample(dataset, save_root, train_count=1, val_count=1)
    assert (save_root / 'LICENSE').read_text() == 'licence' and len(listed(save_root)) == 7


def add_foreign(save_root, kind):
    """Put something into save_root's folders that this script did not write; return its path."""
    if kind == 'file':
        path = save_root / 'trainA' / 'mine.png'
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)
    elif kind == 'hidden file':
        path = save_root / 'valB' / '.notes'
        path.write_text('mine')
    elif kind == 'folder':
        path = save_root / 'trainB_seg' / 'drafts'
        path.mkdir()
        (path / 'draft_0.png').write_bytes(b'mine')
    elif kind == 'link':  # under a name the marker lists
        path = save_root / 'valA' / '0010.png'
        path.unlink()
        path.symlink_to(save_root.parent / 'generated' / 'valA' / '0010.png')
    elif kind == 'linked folder':  # holding the files the marker lists
        path = save_root / 'valB'
        path.rename(save_root.parent / 'elsewhere')
        path.symlink_to(save_root.parent / 'elsewhere')
    return path


@pytest.mark.parametrize('kind', ['file', 'hidden file', 'folder', 'link', 'linked folder'])
def test_a_foreign_path_is_refused_by_name_and_nothing_changes(dataset, tmp_path, kind):
    save_root = tmp_path / 'sample'
    make_sample(dataset, save_root, train_count=1, val_count=1)
    foreign = add_foreign(save_root, kind)
    before = snapshot(save_root)
    with pytest.raises(SampleError) as error:
        make_sample(dataset, save_root, train_count=2, val_count=2)
    assert str(error.value) == (
        f'--save_root {save_root}: {foreign} was not written by this script (not in its {MARKER}), '
        'and its folder would be replaced; move it out or choose another --save_root'
    )
    assert snapshot(save_root) == before


def test_a_dataset_without_marker_is_refused_naming_its_first_file(dataset, tmp_path):
    """Pointed at a user's own dataset (here the generated one), it deletes nothing."""
    before = snapshot(dataset)
    with pytest.raises(SampleError) as error:
        make_sample(dataset, dataset)
    assert str(error.value) == (
        f'--save_root {dataset}: {dataset / "trainA" / "0001.png"} (and 17 more) was not written '
        f'by this script (and it has no {MARKER}), and its folder would be replaced; move it out '
        'or choose another --save_root'
    )
    assert snapshot(dataset) == before


@pytest.mark.parametrize('marker', ['{"files": "trainA/0001.png"}', 'not json', '{}'])
def test_an_unreadable_marker_is_refused(dataset, tmp_path, marker):
    save_root = tmp_path / 'sample'
    make_sample(dataset, save_root, train_count=1, val_count=1)
    (save_root / MARKER).write_text(marker)
    before = snapshot(save_root)
    with pytest.raises(SampleError, match=f'^{save_root / MARKER}: unreadable list'):
        make_sample(dataset, save_root, train_count=1, val_count=1)
    assert snapshot(save_root) == before


def test_the_command_refuses_in_one_line_with_a_non_zero_exit(dataset, tmp_path):
    save_root = tmp_path / 'sample'
    make_sample(dataset, save_root, train_count=1, val_count=1)
    foreign = add_foreign(save_root, 'file')
    before = snapshot(save_root)
    command = [sys.executable, str(DATASETS / 'make_ccp_sample.py'), '--dataset', str(dataset)]
    result = subprocess.run(
        command + ['--save_root', str(save_root)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f'make_ccp_sample.py: --save_root {save_root}: {foreign} was not written')
    assert snapshot(save_root) == before


def test_a_failed_run_leaves_the_old_sample_and_no_staging(dataset, tmp_path):
    save_root = tmp_path / 'sample'
    make_sample(dataset, save_root, train_count=1, val_count=1)
    before = snapshot(save_root)
    with pytest.raises(SampleError, match='only 2 usable photos, 3 needed'):
        make_sample(dataset, save_root, train_count=3, val_count=1)  # fails after trainA is built
    assert snapshot(save_root) == before
    with pytest.raises(SampleError):
        make_sample(dataset, tmp_path / 'new' / 'sample', train_count=3)
    assert os.listdir(tmp_path / 'new') == []  # the folder it made is gone again


@pytest.mark.parametrize('failure', [OSError(28, 'No space left on device'), KeyboardInterrupt()])
@pytest.mark.parametrize('at', [1, 4, 7, 12])  # renames of old folders, then of new ones
def test_an_interrupted_swap_puts_the_old_sample_back(dataset, tmp_path, monkeypatch, failure, at):
    save_root = tmp_path / 'sample'
    make_sample(dataset, save_root, train_count=1, val_count=1)
    before = snapshot(save_root)
    renames = []

    def rename(source, target):
        renames.append(source)
        if len(renames) == at:
            raise failure
        os.replace(source, target)

    monkeypatch.setattr(make_ccp_sample.os, 'rename', rename)
    with pytest.raises(type(failure)):
        make_sample(dataset, save_root, train_count=2, val_count=2)
    assert snapshot(save_root) == before


def test_a_staging_folder_of_an_ended_run_is_removed_and_a_live_ones_kept(dataset, tmp_path, capsys):
    save_root = tmp_path / 'sample'
    make_sample(dataset, save_root, train_count=1, val_count=1)
    ended, live = save_root / f'{STAGING_PREFIX}ended', save_root / f'{STAGING_PREFIX}live'
    for folder, owner in [(ended, dict(this_process(), start_time=-1)), (live, this_process())]:
        (folder / 'new' / 'trainA').mkdir(parents=True)
        (folder / OWNER_FILE).write_text(json.dumps(owner))
    make_sample(dataset, save_root, train_count=1, val_count=1)
    assert not ended.exists() and live.is_dir()
    assert f'make_ccp_sample.py: removed {ended}, left by an interrupted run' in capsys.readouterr().err
