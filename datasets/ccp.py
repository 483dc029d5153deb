"""Reading Clothing Co-Parsing (CCP) and the rules that turn its label maps into instances.

Shared by datasets/generate_ccp_dataset.py (which runs with datasets/ on sys.path and imports
this as `ccp`) and the top-level code (`from datasets import ccp`), so that the mask predictor
sees the same instances and holds out the same photos as the InstaGAN datasets do.

A CCP copy holds photos/NNNN.jpg, annotations/pixel-level/NNNN.mat (variable `groundtruth`, a
label map of the photo's size), annotations/image-level/NNNN.mat (variable `tags`) and
label_list.mat (variable `label_list`, the category names indexed by label id, 0 = 'null').
"""

from pathlib import Path

import numpy as np
import scipy.io
import scipy.ndimage
from PIL import Image


class DatasetError(Exception):
    """The input is not a usable CCP copy or the request cannot be met; the message is one line."""


def load_mat(path, variable):
    try:
        return scipy.io.loadmat(str(path))[variable]
    except Exception as error:  # scipy reports corrupt files with many unrelated exception types
        raise DatasetError(
            f'{path}: unreadable .mat file or no variable {variable!r} ({type(error).__name__}: {error})'
        ) from None


def load_photo(path):
    try:
        with Image.open(path) as photo:
            return photo.convert('RGB')  # convert() decodes fully, so truncated files fail here
    except Exception as error:  # PIL reports corrupt files with many unrelated exception types
        raise DatasetError(f'{path}: unreadable photo ({type(error).__name__}: {error})') from None


def label_names(data_root):
    """Category names indexed by CCP label id (0 is 'null')."""
    cells = load_mat(Path(data_root) / 'label_list.mat', 'label_list').ravel()
    return [str(cell[0]) if cell.size else '' for cell in cells]


def check_layout(data_root):
    data_root = Path(data_root)
    parts = ['photos', 'annotations/pixel-level', 'annotations/image-level', 'label_list.mat']
    for path in [data_root] + [data_root / part for part in parts]:
        if not path.exists():
            raise DatasetError(f'{path}: not found (expected a Clothing Co-Parsing copy at {data_root})')


def label_of(names, category):
    """The label id of `category` in label_names' list; DatasetError lists the valid ones."""
    if category in ('', 'null') or category not in names:
        valid = sorted(name for name in names if name not in ('', 'null'))
        raise DatasetError(f'{category!r}: unknown category; valid categories: {", ".join(valid)}')
    return names.index(category)


def load_label_map(annotation_path):
    """A pixel-level annotation's label map, checked to be a 2-D array of non-negative integers
    (a .mat file is data from elsewhere)."""
    labels = load_mat(annotation_path, 'groundtruth')
    if labels.ndim != 2 or labels.dtype.kind not in 'iu' or labels.size == 0 or labels.min() < 0:
        raise DatasetError(
            f'{annotation_path}: groundtruth is not a 2-D map of label ids '
            f'({labels.dtype}, shape {labels.shape})'
        )
    return labels


def instance_masks(region, split_instances, min_instance_area):
    """A category's bool region as a list of instance masks, empty if nothing is left."""
    if not split_instances:
        return [region] if region.any() else []
    components, count = scipy.ndimage.label(region, structure=np.ones((3, 3), bool))
    areas = np.bincount(components.ravel(), minlength=count + 1) / region.size
    return [components == index for index in range(1, count + 1) if areas[index] >= min_instance_area]


def pick_test_names(names, test_fraction, seed):
    """The held-out subset of `names`, which must be sorted so that worker order does not matter."""
    if test_fraction == 0 or len(names) < 2:
        return frozenset()
    # At least one photo so a small category still gets a test set, never all so training can run.
    size = min(max(round(test_fraction * len(names)), 1), len(names) - 1)
    order = np.random.RandomState(seed).permutation(len(names))  # the same on every machine
    return frozenset(names[index] for index in order[:size])


def photos_with(label_maps, label, split_instances=False, min_instance_area=0.002):
    """The sorted names, among `label_maps` ({name: label map}), of the photos that give at
    least one instance of `label`: the photos generate_ccp_dataset.py puts in train/test."""
    return sorted(
        name
        for name, labels in label_maps.items()
        if instance_masks(labels == label, split_instances, min_instance_area)
    )


def held_out_names(label_maps, label, test_fraction, seed, split_instances=False, min_instance_area=0.002):
    """The photos of `label` that generate_ccp_dataset.py --test-fraction test_fraction
    --split-seed seed (with the same instance flags) puts in its test folder, given the label
    maps of every pixel-level annotation of the CCP copy ({name: label map})."""
    return pick_test_names(
        photos_with(label_maps, label, split_instances, min_instance_area), test_fraction, seed
    )


def read_label_maps(data_root, names=None):
    """{name: label map} of the pixel-level annotations of a CCP copy, in name order; all of
    them, or only `names`."""
    folder = Path(data_root) / 'annotations' / 'pixel-level'
    paths = (
        sorted(folder.glob('*.mat')) if names is None else [folder / f'{name}.mat' for name in sorted(names)]
    )
    return {path.stem: load_label_map(path) for path in paths}
