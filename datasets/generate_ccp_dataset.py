"""Build an InstaGAN dataset (e.g. jeans <-> skirt) from Clothing Co-Parsing (CCP).

    python datasets/generate_ccp_dataset.py --data_root datasets/clothing-co-parsing
    python datasets/generate_ccp_dataset.py --cat1 shoes --cat2 boots --split-instances \
                                            --save_root datasets/shoes2boots_ccp
    python datasets/generate_ccp_dataset.py --test-fraction 0.1 --split-seed 0

Output layout, with A = --cat1 and B = --cat2:

    trainA/NAME.png, trainA_seg/NAME_0.png   photos with a pixel-level annotation that contains
    trainB/NAME.png, trainB_seg/NAME_0.png   the category; the mask is 255 on it, 0 elsewhere
    testA/NAME.png, testA_seg/NAME_0.png     with --test-fraction F > 0 only: that held-out
    testB/NAME.png, testB_seg/NAME_0.png     fraction of the train photos, laid out like train
    valA/NAME.png, valB/NAME.png             photos whose image-level tags contain the category

CCP labels each pixel with one category, so by default a category gives exactly one instance
mask per photo: its whole region. With --split-instances every 8-connected component of the
region that covers at least --min-instance-area of the photo becomes an instance of its own
(NAME_0.png, NAME_1.png, ... in scan order), e.g. each shoe of a pair; training photos with
no component left are skipped. Everything is written to a hidden sibling folder that is
renamed into place at the end, so an interrupted run never leaves a half-written dataset behind.
That staging folder names the process writing it (staging.json); a run killed too hard to remove
its own (kill -9, a lost machine) has it removed by the next run for the same --save_root, once
that process is seen to be gone.

Every dataset holds .generate_ccp_dataset.json, a record of the arguments and counts it was made
with and of every file it wrote. --overwrite replaces only such a folder, and only while it holds
nothing but those files, anywhere in its tree; --save_root may neither be, contain nor lie inside
--data_root. A category that no pixel-level annotation contains (CCP's clogs, for one) is
refused, as its train folder would be empty. All of this is checked before anything is written.

--test-fraction F moves round(F * count) of each category's pixel-annotated photos (at least one
and never all of them when there are two or more) from train to test. The photos are drawn with
--split-seed from the sorted photo names, so the same seed and CCP copy give the same split on
every machine. Each category is split on its own: a photo that contains both can be in testA
and in trainB. The default F = 0 writes no test folders.
"""

import argparse
import json
import os
import shutil
import signal
import sys
from contextlib import contextmanager
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np

# datasets/ is on sys.path when this script runs (top-level code imports `datasets.ccp`);
# the project root goes after it, for runtime/.
from ccp import DatasetError, check_layout, instance_masks, label_names, load_mat, load_photo, pick_test_names
from PIL import Image
from tqdm import tqdm

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from runtime.processes import left_by_ended_processes, make_owned_folder

MARKER = '.generate_ccp_dataset.json'
# The folders a run makes in save_root; the files it writes are listed in the marker.
OUTPUT_FOLDERS = {'valA', 'valB'} | {
    f'{split}{domain}{seg}' for split in ('train', 'test') for domain in 'AB' for seg in ('', '_seg')
}


def leave_signals_to_main_process():
    """Pool initializer: stop signals reach only the main process, which cleans up and ends
    the pool. A worker ignores Ctrl-C and leaves the process group, so that a signal to the
    group (kill -- -PGID) does not kill it while it holds the pool's task queue lock, which
    would make Pool.terminate() wait forever. On Linux it also ends with the main process:
    orphaned by kill -9, it would go on writing the tasks already sent to it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # so that Pool.terminate() still works
    os.setpgrp()
    if sys.platform == 'linux':
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def find_instances(annotation_path, targets, split_instances, min_instance_area):
    """The label map and (domain, instance masks) for every (domain, label) of `targets` present."""
    labels = load_mat(annotation_path, 'groundtruth')
    found = [
        (domain, masks)
        for domain, label in targets
        if (masks := instance_masks(labels == label, split_instances, min_instance_area))
    ]
    return labels, found


def pixel_level_domains(annotation_path, **instance_args):
    """The photo name and the domains it will be exported to."""
    _, found = find_instances(annotation_path, **instance_args)
    return annotation_path.stem, [domain for domain, _ in found]


def pixel_level_labels(annotation_path):
    return np.unique(load_mat(annotation_path, 'groundtruth')).tolist()


def export_pixel_level(annotation_path, photos, out, targets, test_names, **instance_args):
    """Save photo and masks into train{domain}, or test{domain} for names in test_names[domain],
    for every (domain, label) of `targets` present; return the folders written to."""
    labels, found = find_instances(annotation_path, targets, **instance_args)
    folders = []
    if found:
        name = annotation_path.stem
        photo = load_photo(photos / f'{name}.jpg')
        if photo.size != labels.shape[::-1]:
            height, width = labels.shape
            raise DatasetError(
                f'{annotation_path}: annotation is {width}x{height} '
                f'but its photo is {photo.width}x{photo.height}'
            )
        for domain, masks in found:
            folder = f'test{domain}' if name in test_names.get(domain, ()) else f'train{domain}'
            photo.save(out / folder / f'{name}.png')
            for index, mask in enumerate(masks):
                mask = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8))
                mask.save(out / f'{folder}_seg' / f'{name}_{index}.png')
            folders.append(folder)
    return folders


def export_image_level(annotation_path, photos, out, targets):
    """Save the photo into val{domain} for every (domain, label) of `targets` it is tagged with;
    return the folders written to."""
    tags = load_mat(annotation_path, 'tags').ravel()
    found = [domain for domain, label in targets if label in tags]
    if found:
        name = annotation_path.stem
        photo = load_photo(photos / f'{name}.jpg')
        for domain in found:
            photo.save(out / f'val{domain}' / f'{name}.png')
    return [f'val{domain}' for domain in found]


def run_parallel(pool, function, annotations, description):
    """Yield `function` of every annotation file, in any order, with a progress bar."""
    files = sorted(annotations.glob('*.mat'))
    # The context closes the bar before an error message is printed, not at interpreter exit.
    with tqdm(total=len(files), desc=description, unit='file') as progress:
        for result in pool.imap_unordered(function, files, chunksize=8):
            yield result
            progress.update()


def photos_per_domain(pool, annotations, **instance_args):
    """The sorted names of each domain's pixel-level photos, so that worker order does not
    matter."""
    names = {'A': [], 'B': []}
    scan = partial(pixel_level_domains, **instance_args)
    for name, domains in run_parallel(pool, scan, annotations, 'scan (pixel-level)'):
        for domain in domains:
            names[domain].append(name)
    return {domain: sorted(domain_names) for domain, domain_names in names.items()}


def run_export(pool, export, annotations, description):
    """Run `export` on every annotation file in parallel; return the photo count per folder."""
    counts = {}
    for folders in run_parallel(pool, export, annotations, description):
        for folder in folders:
            counts[folder] = counts.get(folder, 0) + 1
    return counts


def is_within(path, folder):
    """Whether the resolved `path` is the resolved `folder` or lies inside it. File identities
    are compared as well as names, which also sees through bind mounts and case-insensitive
    file systems."""
    return any(
        candidate == folder
        or (candidate.exists() and folder.exists() and os.path.samefile(candidate, folder))
        for candidate in [path, *path.parents]
    )


def written_files(save_root):
    """The files (paths relative to save_root) its marker says this script wrote."""
    try:
        files = json.loads((save_root / MARKER).read_text())['files']
        if not isinstance(files, list) or not all(isinstance(file, str) for file in files):
            raise TypeError('files is not a list of paths')
    except KeyError:
        raise DatasetError(
            f'--save_root {save_root}: its {MARKER} does not list the files this '
            'script wrote (an earlier version made it), so --overwrite cannot '
            'tell them from yours; delete the folder yourself'
        ) from None
    except (OSError, ValueError, TypeError) as error:
        raise DatasetError(
            f'--save_root {save_root}: {MARKER} is unreadable ('
            f'{type(error).__name__}: {error}); delete the folder yourself'
        ) from None
    return set(files)


def foreign_paths(save_root, written):
    """Everything under save_root that this script did not write, sorted: files other than the
    marker and those in `written`, links, and folders other than its output folders (a foreign
    folder is listed alone, not what it holds)."""
    ours = written | {MARKER}
    foreign = []
    for folder, folders, files in os.walk(save_root):
        relative = Path(folder).relative_to(save_root)
        for name in sorted(folders):
            path = relative / name
            if len(path.parts) > 1 or name not in OUTPUT_FOLDERS or (save_root / path).is_symlink():
                foreign.append(path)
                folders.remove(name)
        folders.sort()
        foreign += [
            relative / name
            for name in sorted(files)
            if (relative / name).as_posix() not in ours or (save_root / relative / name).is_symlink()
        ]
    return sorted(foreign)


def check_save_root(save_root, data_root, overwrite):
    """Refuse a save_root whose writing or replacement could lose data; both paths are resolved."""
    inside, contains = is_within(save_root, data_root), is_within(data_root, save_root)
    if inside or contains:
        relation = 'is' if inside and contains else 'lies inside' if inside else 'contains'
        raise DatasetError(
            f'--save_root {save_root} {relation} --data_root {data_root}; '
            'write the dataset outside the CCP copy'
        )
    existing = next(path for path in [save_root, *save_root.parents] if path.exists())
    if not existing.is_dir():
        raise DatasetError(f'--save_root {save_root}: {existing} exists and is not a folder')
    if existing != save_root:
        return
    if not (save_root / MARKER).is_file():
        raise DatasetError(
            f'--save_root {save_root}: exists and has no {MARKER}, the mark of a '
            'dataset made by this script; --overwrite replaces only those, so '
            'choose another folder or remove it yourself'
        )
    if not overwrite:
        raise DatasetError(f'--save_root {save_root}: already exists; pass --overwrite to replace it')
    foreign = foreign_paths(save_root, written_files(save_root))
    if foreign:
        more = f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''
        raise DatasetError(
            f'--save_root {save_root}: holds {save_root / foreign[0]}{more}, which '
            'this script did not write; move it out before using --overwrite'
        )


def remove_stale_staging(save_root):
    """Remove the staging folders of earlier runs for save_root whose process is gone (kill -9
    leaves one behind). Only those naming a process of this host are judged; any other is left
    alone."""
    for path, owner, gone in left_by_ended_processes(save_root.parent, staging_prefix(save_root)):
        if (path / 'replaced').is_dir() and not save_root.exists():  # killed between renames
            os.rename(path / 'replaced', save_root)
            print(f'generate_ccp_dataset.py: restored {save_root} from {path}', file=sys.stderr)
        shutil.rmtree(path)
        print(
            f'generate_ccp_dataset.py: removed {path}, the staging folder of an interrupted '
            f'run (pid {owner["pid"]}: {gone})',
            file=sys.stderr,
        )


def staging_prefix(save_root):
    return f'.{save_root.name}.'


@contextmanager
def staging_folder(save_root):
    """A new hidden folder next to save_root, so that the final rename stays on one file system;
    it names this process, and is removed with everything in it (a replaced old dataset too)
    when the block ends, on success and failure alike."""
    staging = make_owned_folder(save_root.parent, staging_prefix(save_root))
    try:
        yield staging
    finally:
        shutil.rmtree(staging)


def generate(
    data_root,
    save_root,
    cat1='jeans',
    cat2='skirt',
    overwrite=False,
    workers=2,
    split_instances=False,
    min_instance_area=0.002,
    test_fraction=0.0,
    split_seed=0,
):
    """Write the cat1 (A) <-> cat2 (B) dataset to save_root; return {'trainA': count, ...}
    with testA and testB only when test_fraction > 0. main()'s argparse types check the ranges
    of the numbers."""
    data_root, save_root = Path(data_root).resolve(), Path(save_root).resolve()
    if save_root.parent.is_dir():
        remove_stale_staging(save_root)
    check_save_root(save_root, data_root, overwrite)
    check_layout(data_root)
    names = label_names(data_root)
    categories = sorted(name for name in names if name not in ('', 'null'))
    for flag, category in [('--cat1', cat1), ('--cat2', cat2)]:
        if category not in categories:
            raise DatasetError(
                f'{flag} {category!r}: unknown category; valid categories: {", ".join(categories)}'
            )
    if cat1 == cat2:
        raise DatasetError(f'--cat1 and --cat2 are both {cat1!r}; they must differ')

    targets = [('A', names.index(cat1)), ('B', names.index(cat2))]
    annotations = data_root / 'annotations'
    instance_args = dict(split_instances=split_instances, min_instance_area=min_instance_area)
    with Pool(workers, initializer=leave_signals_to_main_process) as pool:
        photo_names = photos_per_domain(pool, annotations / 'pixel-level', targets=targets, **instance_args)
        for flag, category, domain in [('--cat1', cat1, 'A'), ('--cat2', cat2, 'B')]:
            if not photo_names[domain]:
                area = (
                    f' in a region of at least --min-instance-area {min_instance_area}'
                    if split_instances
                    else ''
                )
                labels = set().union(
                    *run_parallel(pool, pixel_level_labels, annotations / 'pixel-level', 'categories')
                )
                present = sorted(
                    name for label, name in enumerate(names) if label in labels and name not in ('', 'null')
                )
                raise DatasetError(
                    f'{flag} {category!r}: no pixel-level annotation contains '
                    f'it{area}, so train{domain} would be empty; categories '
                    f'with pixel-level photos: {", ".join(present)}'
                )
        test_names = {
            domain: pick_test_names(domain_names, test_fraction, split_seed)
            for domain, domain_names in photo_names.items()
        }

        save_root.parent.mkdir(parents=True, exist_ok=True)
        with staging_folder(save_root) as staging:
            out = staging / save_root.name
            photo_folders = ['trainA', 'trainB'] + (['testA', 'testB'] if test_fraction > 0 else [])
            try:
                for folder in photo_folders + ['valA', 'valB']:
                    (out / folder).mkdir(parents=True)
                for folder in photo_folders:
                    (out / f'{folder}_seg').mkdir()
                export_args = dict(photos=data_root / 'photos', out=out, targets=targets)
                found = run_export(
                    pool,
                    partial(export_pixel_level, **export_args, test_names=test_names, **instance_args),
                    annotations / 'pixel-level',
                    'train (pixel-level)',
                )
                found |= run_export(
                    pool,
                    partial(export_image_level, **export_args),
                    annotations / 'image-level',
                    'val (image-level)',
                )
            finally:
                # A worker still writing into the staging folder would make its removal fail
                # and leave it behind.
                pool.terminate()
                pool.join()
            counts = {folder: found.get(folder, 0) for folder in photo_folders + ['valA', 'valB']}
            files = sorted(path.relative_to(out).as_posix() for path in out.rglob('*') if path.is_file())
            record = dict(
                data_root=str(data_root),
                cat1=cat1,
                cat2=cat2,
                split_instances=split_instances,
                min_instance_area=min_instance_area,
                test_fraction=test_fraction,
                split_seed=split_seed,
                counts=counts,
                files=files,
            )
            (out / MARKER).write_text(json.dumps(record, indent=2) + '\n')
            check_save_root(save_root, data_root, overwrite)  # in case it appeared meanwhile
            if save_root.exists():
                os.rename(save_root, staging / 'replaced')
            os.rename(out, save_root)
    return counts


def number_in(kind, low, below, bounds):
    """argparse type: a `kind` (int or float) x with low <= x < below; `bounds` words the range."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            noun = 'an integer' if kind is int else 'a number'
            raise argparse.ArgumentTypeError(f'{text!r} is not {noun}') from None
        if not low <= value < below:  # also rejects nan
            raise argparse.ArgumentTypeError(f'{text} must be in {bounds}')
        return value

    return parse


def terminated(*_):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit('generate_ccp_dataset.py: terminated')


def main():
    cores = os.cpu_count() or 1
    fraction = number_in(float, 0, 1, '[0, 1)')
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--data_root', default='datasets/clothing-co-parsing', help='CCP copy')
    parser.add_argument(
        '--save_root', default='datasets/jeans2skirt_ccp', help='output folder, outside data_root'
    )
    parser.add_argument('--cat1', default='jeans', help='category of domain A')
    parser.add_argument('--cat2', default='skirt', help='category of domain B')
    parser.add_argument(
        '--overwrite', action='store_true', help='replace a save_root that this script made earlier'
    )
    parser.add_argument(
        '--workers',
        type=number_in(int, 1, cores + 1, f'[1, {cores}], the cores here'),
        default=cores,
        help='worker processes (default: one per core)',
    )
    parser.add_argument(
        '--split-instances',
        action='store_true',
        help='one instance per connected component instead of per category',
    )
    parser.add_argument(
        '--min-instance-area',
        type=fraction,
        default=0.002,
        help='with --split-instances, drop components smaller than this fraction of the photo area',
    )
    parser.add_argument(
        '--test-fraction',
        type=fraction,
        default=0.0,
        help="hold out this fraction of each category's pixel-annotated photos "
        'in testA(_seg)/testB(_seg); 0 makes no test folders',
    )
    parser.add_argument(
        '--split-seed',
        type=number_in(int, 0, 2**32, '[0, 2**32)'),
        default=0,
        help='seed that picks the --test-fraction photos',
    )
    args = parser.parse_args()
    # Let `kill` unwind like Ctrl-C does, so the staging folder is removed (a second SIGTERM
    # must not cut that short).
    signal.signal(signal.SIGTERM, terminated)
    try:
        counts = generate(
            args.data_root,
            args.save_root,
            args.cat1,
            args.cat2,
            args.overwrite,
            args.workers,
            args.split_instances,
            args.min_instance_area,
            args.test_fraction,
            args.split_seed,
        )
    except (DatasetError, OSError) as error:  # OSError: a full disk, a read-only folder, ...
        sys.exit(f'generate_ccp_dataset.py: {error}')
    except KeyboardInterrupt:  # the staging folder is gone by now, as on any error
        sys.exit('generate_ccp_dataset.py: stopped by Ctrl-C; nothing was written')
    print(f'{args.save_root}:', ', '.join(f'{folder} {count}' for folder, count in counts.items()))


if __name__ == '__main__':
    main()
