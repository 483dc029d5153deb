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
read by the project's reader (data.read_photo, data.load_mask). Only the six image folders are
replaced, so LICENSE and NOTICE.md in save_root stay.
"""

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the project root, for data and runtime/
from data import DataError, load_mask, read_photo, resize

LOAD_SIZE = (330, 220)  # (H, W)


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
        raise SystemExit(
            f'make_ccp_sample.py: {dataset / f"{phase}{domain}"}: '
            f'only {len(ids)} usable photos, {count} needed'
        )
    return ids[:count]


def make_sample(dataset, save_root, train_count=8, val_count=4, min_area=0.05, min_instances=1, exclude=()):
    dataset, save_root = Path(dataset), Path(save_root)
    for phase, count in [('train', train_count), ('val', val_count)]:
        for domain in 'AB':
            folders = [f'{phase}{domain}'] + ([f'train{domain}_seg'] if phase == 'train' else [])
            for folder in folders:
                shutil.rmtree(save_root / folder, ignore_errors=True)
                (save_root / folder).mkdir(parents=True)
            ids = pick(dataset, phase, domain, count, min_area, min_instances, set(exclude))
            for name in ids:
                photo = read_photo(dataset / f'{phase}{domain}' / f'{name}.png')
                Image.fromarray(resize(photo, LOAD_SIZE, 'bilinear')).save(
                    save_root / f'{phase}{domain}' / f'{name}.png', optimize=True
                )
                if phase == 'train':
                    masks = resized_instances(dataset / f'train{domain}_seg', name)
                    for index, mask in enumerate(masks):
                        Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(
                            save_root / f'train{domain}_seg' / f'{name}_{index}.png', optimize=True
                        )
            print(f'{phase}{domain}: {" ".join(ids)}')


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
    except DataError as error:
        sys.exit(f'make_ccp_sample.py: {error}')


if __name__ == '__main__':
    main()
