"""Cut the small bundled sample (datasets/ccp_sample) out of a generated CCP dataset.

    python datasets/generate_ccp_dataset.py --save_root datasets/jeans2skirt_ccp
    python datasets/make_ccp_sample.py --dataset datasets/jeans2skirt_ccp \
                                       --save_root datasets/ccp_sample

Takes, in id order, the first photos that show only one of the two categories and, for
training photos, whose mask covers at least --min_area of the image, so that the garment is
clearly visible. Everything is shrunk to the training load size; masks are resized the same
way and re-binarised to 0/255. Only the six image folders are replaced, so LICENSE and
NOTICE.md in save_root stay.
"""
import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

LOAD_SIZE = (220, 330)  # (W, H) in PIL order, i.e. 330x220 HxW


def read_mask(path, size=None):
    with Image.open(path) as mask:
        mask = mask.convert('L')
        values = np.asarray(mask.resize(size, Image.BILINEAR) if size else mask)
    return values >= 128


def pick(dataset, phase, domain, count, min_area):
    """Ids of the first `count` usable photos of {phase}{domain}."""
    other = 'B' if domain == 'A' else 'A'
    in_other = {path.stem for path in (dataset / f'{phase}{other}').glob('*.png')}
    ids = [path.stem for path in sorted((dataset / f'{phase}{domain}').glob('*.png'))
           if path.stem not in in_other]
    if phase == 'train':
        ids = [name for name in ids
               if read_mask(dataset / f'train{domain}_seg' / f'{name}_0.png').mean() >= min_area]
    if len(ids) < count:
        raise SystemExit(f'make_ccp_sample.py: {dataset / f"{phase}{domain}"}: '
                         f'only {len(ids)} usable photos, {count} needed')
    return ids[:count]


def make_sample(dataset, save_root, train_count=8, val_count=4, min_area=0.05):
    dataset, save_root = Path(dataset), Path(save_root)
    for phase, count in [('train', train_count), ('val', val_count)]:
        for domain in 'AB':
            folders = [f'{phase}{domain}'] + ([f'train{domain}_seg'] if phase == 'train' else [])
            for folder in folders:
                shutil.rmtree(save_root / folder, ignore_errors=True)
                (save_root / folder).mkdir(parents=True)
            ids = pick(dataset, phase, domain, count, min_area)
            for name in ids:
                with Image.open(dataset / f'{phase}{domain}' / f'{name}.png') as image:
                    image.convert('RGB').resize(LOAD_SIZE, Image.BILINEAR).save(
                        save_root / f'{phase}{domain}' / f'{name}.png', optimize=True)
                if phase == 'train':
                    mask = read_mask(dataset / f'train{domain}_seg' / f'{name}_0.png', LOAD_SIZE)
                    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(
                        save_root / f'train{domain}_seg' / f'{name}_0.png', optimize=True)
            print(f'{phase}{domain}: {" ".join(ids)}')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--dataset', default='datasets/jeans2skirt_ccp',
                        help='output of generate_ccp_dataset.py')
    parser.add_argument('--save_root', default='datasets/ccp_sample')
    parser.add_argument('--train_count', type=int, default=8, help='photos per training domain')
    parser.add_argument('--val_count', type=int, default=4, help='photos per validation domain')
    parser.add_argument('--min_area', type=float, default=0.05, help='smallest mask area fraction')
    args = parser.parse_args()
    make_sample(args.dataset, args.save_root, args.train_count, args.val_count, args.min_area)


if __name__ == '__main__':
    main()
