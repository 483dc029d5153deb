"""Cut a small bundled sample (datasets/ccp_sample) out of a generated CCP dataset.

    python datasets/generate_ccp_dataset.py --save_root datasets/jeans2skirt_ccp
    python datasets/make_ccp_sample.py --dataset datasets/jeans2skirt_ccp \
                                       --save_root datasets/ccp_sample

The multi-instance sample (datasets/ccp_multi_sample) comes from a --split-instances dataset:

    python datasets/generate_ccp_dataset.py --cat1 shoes --cat2 boots --split-instances \
                                            --save_root datasets/shoes2boots_ccp
    python datasets/make_ccp_sample.py --dataset datasets/shoes2boots_ccp \
                                       --save_root datasets/ccp_multi_sample --train_count 6 \
                                       --val_count 2 --min_area 0.005 --min_instances 2 \
                                       --exclude 0883

Takes the first photos that show only one of the two categories and, for training photos,
whose instances together cover at least --min_area of the image, so that the garment is
clearly visible, and of which at least --min_instances are left at load size. Training photos
with more instances come first; otherwise photos go in id order. --exclude leaves out photos
with annotation errors (in 0883 part of a sleeve is labelled shoes). Everything is shrunk to
the training load size; masks are resized the same way and re-binarised to 0/255, and
instances that vanish in the resize are dropped, the rest renumbered without gaps. Files are
read by the project's reader (data.read_photo, data.load_mask).

Only the six image folders (trainA, trainA_seg, trainB, trainB_seg, valA, valB) are replaced,
so LICENSE and NOTICE.md in save_root stay. save_root's .make_ccp_sample.json lists every file
this script wrote there; a save_root whose six folders hold anything else (or hold files and
have no such list) is refused before anything is written, naming the first foreign file. The
new sample is built in a hidden staging folder inside save_root, which names this process, and
moved into place by renames that are undone on any error, Ctrl-C or SIGTERM; the staging folder
is then removed. One left by kill -9 is removed by the next run once its process is gone (killed
between two renames, save_root holds a mix of old and new folders, all listed, until that run).
"""

import argparse
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the project root, for data and runtime/
from data import DataError, load_mask, read_photo, resize
from runtime.processes import left_by_ended_processes, make_owned_folder

LOAD_SIZE = (330, 220)  # (H, W)
MARKER = '.make_ccp_sample.json'
FOLDERS = ['trainA', 'trainA_seg', 'trainB', 'trainB_seg', 'valA', 'valB']  # what a run replaces
STAGING_PREFIX = '.make_ccp_sample-staging.'


class SampleError(Exception):
    """The sample cannot be made or written; the message is one line."""


def resized_instances(seg_folder, name):
    """Bool masks of photo `name` at LOAD_SIZE, without those that vanish in the resize."""
    paths = sorted(seg_folder.glob(f'{name}_*.png'), key=lambda path: int(path.stem.split('_')[-1]))
    masks = (
        resize(np.where(load_mask(path), 255, 0).astype(np.uint8), LOAD_SIZE, 'bilinear') for path in paths
    )
    return [mask for mask in (values >= 128 for values in masks) if mask.any()]


def pick(dataset, phase, domain, count, min_area, min_instances, exclude):
    """Ids of the first `count` usable photos of {phase}{domain}."""
    other = 'B' if domain == 'A' else 'A'
    in_other = {path.stem for path in (dataset / f'{phase}{other}').glob('*.png')}
    ids = [
        path.stem
        for path in sorted((dataset / f'{phase}{domain}').glob('*.png'))
        if path.stem not in in_other and path.stem not in exclude
    ]
    if phase == 'train':
        instance_counts = {}
        for name in ids:
            masks = resized_instances(dataset / f'train{domain}_seg', name)
            if masks and len(masks) >= min_instances and np.any(masks, axis=0).mean() >= min_area:
                instance_counts[name] = len(masks)
        ids = sorted(instance_counts, key=lambda name: -instance_counts[name])  # stable: id order
    if len(ids) < count:
        raise SampleError(f'{dataset / f"{phase}{domain}"}: only {len(ids)} usable photos, {count} needed')
    return ids[:count]


def listed_files(save_root):
    """The files (paths relative to save_root) that save_root's marker says this script wrote;
    None without a marker."""
    path = save_root / MARKER
    if not path.exists() and not path.is_symlink():
        return None
    try:
        files = json.loads(path.read_text())['files']
        if not isinstance(files, list) or not all(isinstance(file, str) for file in files):
            raise TypeError('files is not a list of paths')
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise SampleError(
            f'{path}: unreadable list of the files this script wrote ({type(error).__name__}: '
            f'{error}); move the folders {", ".join(FOLDERS)} out of {save_root} yourself'
        ) from None
    return set(files)


def foreign_paths(save_root, listed):
    """What the six folders of save_root hold that the marker does not list, in folder order
    then sorted: files, links and subfolders (a foreign folder stands for what it holds)."""
    foreign = []
    for name in FOLDERS:
        folder = save_root / name
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            foreign.append(folder)
        elif folder.is_dir():
            foreign += [
                path
                for path in sorted(folder.iterdir())
                if path.is_symlink()
                or not path.is_file()
                or path.relative_to(save_root).as_posix() not in (listed or ())
            ]
    return foreign


def check_save_root(save_root):
    """Refuse a save_root whose replaced folders hold a file this script did not write."""
    if save_root.exists() and not save_root.is_dir():
        raise SampleError(f'--save_root {save_root}: exists and is not a folder')
    if not save_root.exists():
        return
    listed = listed_files(save_root)
    foreign = foreign_paths(save_root, listed)
    if not foreign:
        return
    more = f' (and {len(foreign) - 1} more)' if len(foreign) > 1 else ''
    why = f'not in its {MARKER}' if listed is not None else f'and it has no {MARKER}'
    raise SampleError(
        f'--save_root {save_root}: {foreign[0]}{more} was not written by this script ({why}), '
        'and its folder would be replaced; move it out or choose another --save_root'
    )


def remove_stale_staging(save_root):
    """Remove the staging folders in save_root of earlier runs of this host whose process is
    gone (kill -9 leaves one behind); any other is left alone."""
    for path, _, gone in left_by_ended_processes(save_root, STAGING_PREFIX):
        shutil.rmtree(path)
        print(f'make_ccp_sample.py: removed {path}, left by an interrupted run ({gone})', file=sys.stderr)


def write_marker(save_root, files):
    """Replace save_root's marker in one rename, so that it is never half-written."""
    partial = save_root / f'{MARKER}.partial'
    try:
        partial.write_text(json.dumps({'files': sorted(files)}, indent=2) + '\n')
        os.replace(partial, save_root / MARKER)
    finally:
        partial.unlink(missing_ok=True)


def swap_in(save_root, staging, written):
    """Move the six folders built in staging/new into save_root and the old ones to staging/old,
    with a marker listing old and new files meanwhile; any failure or interruption undoes the
    renames and puts the old marker back."""
    listed = listed_files(save_root)  # None: no marker yet
    (staging / 'old').mkdir()
    done = []  # (source, target) of every rename so far
    try:
        write_marker(save_root, (listed or set()) | written)
        for name in FOLDERS:
            if (save_root / name).exists():
                os.rename(save_root / name, staging / 'old' / name)
                done.append((save_root / name, staging / 'old' / name))
        for name in FOLDERS:
            os.rename(staging / 'new' / name, save_root / name)
            done.append((staging / 'new' / name, save_root / name))
        write_marker(save_root, written)
    except BaseException:
        for source, target in reversed(done):
            os.rename(target, source)
        if listed is None:
            (save_root / MARKER).unlink(missing_ok=True)
        else:
            write_marker(save_root, listed)
        raise


def build(dataset, new, train_count, val_count, min_area, min_instances, exclude):
    """Write the sample's six folders into `new`; return the files written, relative to it."""
    written = set()

    def save(array, folder, name):
        Image.fromarray(array).save(new / folder / name, optimize=True)
        written.add(f'{folder}/{name}')

    for phase, count in [('train', train_count), ('val', val_count)]:
        for domain in 'AB':
            folders = [f'{phase}{domain}'] + ([f'train{domain}_seg'] if phase == 'train' else [])
            for folder in folders:
                (new / folder).mkdir(parents=True)
            ids = pick(dataset, phase, domain, count, min_area, min_instances, set(exclude))
            for name in ids:
                photo = read_photo(dataset / f'{phase}{domain}' / f'{name}.png')
                save(resize(photo, LOAD_SIZE, 'bilinear'), f'{phase}{domain}', f'{name}.png')
                if phase == 'train':
                    masks = resized_instances(dataset / f'train{domain}_seg', name)
                    for index, mask in enumerate(masks):
                        save(
                            np.where(mask, 255, 0).astype(np.uint8),
                            f'train{domain}_seg',
                            f'{name}_{index}.png',
                        )
            print(f'{phase}{domain}: {" ".join(ids)}')
    return written


def make_sample(dataset, save_root, train_count=8, val_count=4, min_area=0.05, min_instances=1, exclude=()):
    dataset, save_root = Path(dataset), Path(save_root)
    if save_root.is_dir():
        remove_stale_staging(save_root)
    check_save_root(save_root)
    made_root = not save_root.exists()
    save_root.mkdir(parents=True, exist_ok=True)
    staging = make_owned_folder(save_root, STAGING_PREFIX)
    try:
        written = build(dataset, staging / 'new', train_count, val_count, min_area, min_instances, exclude)
        check_save_root(save_root)  # in case a file appeared meanwhile
        swap_in(save_root, staging, written)
    except BaseException:
        shutil.rmtree(staging)
        if made_root:
            save_root.rmdir()  # empty again: nothing else was written there
        raise
    shutil.rmtree(staging)


def terminated(*_):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the undoing short
    sys.exit('make_ccp_sample.py: terminated; the sample is as it was')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument(
        '--dataset', default='datasets/jeans2skirt_ccp', help='output of generate_ccp_dataset.py'
    )
    parser.add_argument('--save_root', default='datasets/ccp_sample')
    parser.add_argument('--train_count', type=int, default=8, help='photos per training domain')
    parser.add_argument('--val_count', type=int, default=4, help='photos per validation domain')
    parser.add_argument('--min_area', type=float, default=0.05, help='smallest mask area fraction')
    parser.add_argument(
        '--min_instances', type=int, default=1, help='fewest instances a training photo keeps at load size'
    )
    parser.add_argument(
        '--exclude',
        nargs='*',
        default=[],
        metavar='ID',
        help='photo ids to leave out, e.g. ones with annotation errors',
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, terminated)  # unwinds like Ctrl-C, so the renames are undone
    try:
        make_sample(
            args.dataset,
            args.save_root,
            args.train_count,
            args.val_count,
            args.min_area,
            args.min_instances,
            args.exclude,
        )
    except (SampleError, DataError, OSError) as error:  # OSError: a full disk, a read-only folder, ...
        sys.exit(f'make_ccp_sample.py: {error}')
    except KeyboardInterrupt:
        sys.exit('make_ccp_sample.py: stopped by Ctrl-C; the sample is as it was')


if __name__ == '__main__':
    main()
