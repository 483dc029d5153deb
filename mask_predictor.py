"""A mask predictor, so that a photo can be translated without hand-made instance masks.

InstaGAN translates a photo together with the masks of its instances. This module predicts
them: a small U-Net (Ronneberger et al. 2015) labels every pixel of an RGB photo as background
or one of the categories a translation model uses (by default jeans and skirt, the categories
of pretrained/jeans2skirt_64x44), and the shared CCP instance rule (datasets/ccp.py) turns each
category's region into instances exactly as generate_ccp_dataset.py does for the training data.

    predictor = load_predictor('pretrained/mask_predictor')
    found = predict_masks(predictor, photo)            # photo: (H, W, 3) uint8, any size
    found['jeans'].region, found['jeans'].instances     # bool (H, W), list of bool (H, W)

The network is plain NNabla (PF.convolution, PF.deconvolution, F.max_pooling and the
models.instance_norm composite) under the parameter scope 'mask_predictor', so it runs on any
device and its parameters never meet the translation model's. Instance normalisation rather
than batch normalisation: training and prediction compute the same thing, with no running
statistics to go stale, and cpu_engine.accelerate moves it (and the convolutions) onto all
CPU cores.

The measures at the end (IoU, instance count, boundary F-score) work on numpy masks, so they
are testable on hand-made masks.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import nnabla as nn
import nnabla.functions as F
import nnabla.parametric_functions as PF
import numpy as np
import scipy.ndimage
from PIL import Image

from datasets import ccp
from models import instance_norm
from runtime import RunError
from runtime.checkpoints import read_parameters
from runtime.files import write_image, write_text

SCOPE = 'mask_predictor'
CONFIG = 'predictor.json'  # written next to parameters.h5
DEFAULT_CATEGORIES = ('jeans', 'skirt')
DEFAULT_OTHER_CATEGORIES = ()
DEFAULT_SIZE = (144, 96)  # CCP photos are 550 wide, 800-870 high: the same aspect ratio
DEFAULT_WIDTH = 16  # channels of the first level; each further level doubles them
DEFAULT_LEVELS = 5


# ---------------------------------------------------------------------------------------------
# The network


def conv_norm_relu(x, outmaps, name):
    """3x3 convolution (zero padding keeps H and W), instance norm, ReLU: the U-Net's unit."""
    with nn.parameter_scope(name):
        h = PF.convolution(x, outmaps, (3, 3), pad=(1, 1), with_bias=False)
    return F.relu(instance_norm(h))


def double_conv(x, outmaps, name):
    """Two units: one level of the U-Net, on either side."""
    with nn.parameter_scope(name):
        return conv_norm_relu(conv_norm_relu(x, outmaps, 'conv1'), outmaps, 'conv2')


def upsample_and_join(x, skip, outmaps, name):
    """2x2 transposed convolution with stride 2 (exactly doubles H and W), then the encoder's
    map of that level alongside, so the fine boundaries come back from it."""
    with nn.parameter_scope(name):
        h = PF.deconvolution(x, outmaps, (2, 2), stride=(2, 2))
    return F.concatenate(h, skip, axis=1)


def unet(image, n_classes, width=DEFAULT_WIDTH, levels=DEFAULT_LEVELS):
    """Per-pixel class logits (B, n_classes, H, W) of an image (B, 3, H, W) in [-1, 1].

    `levels` levels of width, 2 width, 4 width, ... channels; H and W must be multiples of
    2 ** (levels - 1). Call under nn.parameter_scope(SCOPE) (predictor_logits does)."""
    skips, h = [], image
    for level in range(levels):
        h = double_conv(h, width * 2**level, f'down{level}')
        if level < levels - 1:
            skips.append(h)
            h = F.max_pooling(h, (2, 2))
    for level in reversed(range(levels - 1)):
        h = upsample_and_join(h, skips[level], width * 2**level, f'up{level}')
        h = double_conv(h, width * 2**level, f'up{level}')
    with nn.parameter_scope('classifier'):
        return PF.convolution(h, n_classes, (1, 1))


def predictor_logits(image, n_classes, width=DEFAULT_WIDTH, levels=DEFAULT_LEVELS):
    """unet under the predictor's own parameter scope."""
    with nn.parameter_scope(SCOPE):
        return unet(image, n_classes, width, levels)


def check_size(size, levels):
    """Refuse an (H, W) the U-Net cannot pool and unpool back to itself."""
    step = 2 ** (levels - 1)
    if len(size) != 2 or any(int(s) != s or s < step or s % step for s in size):
        raise ValueError(
            f'size {tuple(size)}: H and W must be multiples of {step} (the U-Net has {levels} levels)'
        )


def segmentation_loss(logits, labels, one_hot):
    """Mean per-pixel cross-entropy over all classes plus the soft Dice loss of the categories.

    labels (B, 1, H, W) int class ids; one_hot (B, 1 + K, H, W) float 0/1 planes of the first
    1 + K classes (background and the K categories; other classes get no Dice term). The
    garments cover a few percent of the pixels of a photo (and nothing on most photos), so
    cross-entropy alone is content with a timid foreground; the Dice term, computed over the
    whole batch per class, weighs a class's misses against its own size, which is what IoU
    measures."""
    cross_entropy = F.mean(F.softmax_cross_entropy(logits, labels, axis=1))
    probabilities = F.softmax(logits, axis=1)
    stop = (logits.shape[0], one_hot.shape[1]) + logits.shape[2:]
    foreground = F.slice(probabilities, start=(0, 1, 0, 0), stop=stop)
    target = F.slice(one_hot, start=(0, 1, 0, 0), stop=stop)
    overlap = F.sum(foreground * target, axis=(0, 2, 3))
    total = F.sum(foreground, axis=(0, 2, 3)) + F.sum(target, axis=(0, 2, 3))
    dice = F.mean(1 - (2 * overlap + 1) / (total + 1))
    return cross_entropy + dice


def one_hot_planes(labels, n_classes):
    """(B, 1, H, W) int class ids -> (B, C, H, W) float32 0/1 planes (numpy)."""
    return (labels == np.arange(n_classes).reshape(1, -1, 1, 1)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Images in and out


def to_network_input(photo, size):
    """(H, W, 3) uint8 photo -> (3, h, w) float32 in [-1, 1] at size (h, w), bilinear."""
    resized = Image.fromarray(np.asarray(photo, np.uint8)).resize(size[::-1], Image.BILINEAR)
    return np.asarray(resized, np.float32).transpose(2, 0, 1) / 127.5 - 1


def resize_labels(labels, size):
    """(H, W) integer label map -> (h, w), nearest neighbour (a label is never blended)."""
    rows = (np.arange(size[0]) + 0.5) * labels.shape[0] / size[0]
    columns = (np.arange(size[1]) + 0.5) * labels.shape[1] / size[1]
    return labels[rows.astype(int)[:, None], columns.astype(int)[None, :]]


def resize_probabilities(probabilities, size):
    """(C, h, w) float -> (C, H, W), each plane bilinear, so argmax gives smooth boundaries at
    the photo's resolution rather than the network's blocks."""
    return np.stack(
        [
            np.asarray(Image.fromarray(plane.astype(np.float32), mode='F').resize(size[::-1], Image.BILINEAR))
            for plane in probabilities
        ]
    )


# ---------------------------------------------------------------------------------------------
# A trained predictor


@dataclass
class MaskPredictor:
    """A built prediction graph: categories (class c + 1 is categories[c]), other_categories
    (the classes after them, learnt so that the network tells them from the categories, never
    turned into masks), network size (H, W), width and levels; image and probabilities (the
    softmax) are its input and output variables (batch 1)."""

    categories: tuple
    other_categories: tuple
    size: tuple
    width: int
    levels: int
    image: nn.Variable
    probabilities: nn.Variable

    def class_probabilities(self, photo):
        """(classes, h, w) softmax of a photo (H, W, 3) uint8, at network size."""
        self.image.d = to_network_input(photo, self.size)[None]
        self.probabilities.forward(clear_buffer=True)
        return self.probabilities.d[0].copy()


def build_predictor(
    categories=DEFAULT_CATEGORIES,
    size=DEFAULT_SIZE,
    width=DEFAULT_WIDTH,
    levels=DEFAULT_LEVELS,
    other_categories=DEFAULT_OTHER_CATEGORIES,
):
    """The prediction graph with the current parameters under SCOPE (made if missing)."""
    check_size(size, levels)
    image = nn.Variable((1, 3) + tuple(size))
    logits = predictor_logits(image, 1 + len(categories) + len(other_categories), width, levels)
    probabilities = F.softmax(logits, axis=1)
    probabilities.persistent = True
    return MaskPredictor(
        tuple(categories), tuple(other_categories), tuple(size), width, levels, image, probabilities
    )


def write_config(folder, categories, size, width, levels, other_categories=()):
    """The JSON that load_predictor needs beside parameters.h5."""
    config = dict(
        categories=list(categories),
        other_categories=list(other_categories),
        size=list(size),
        width=width,
        levels=levels,
    )
    write_text(str(Path(folder) / CONFIG), json.dumps(config, indent=1) + '\n')


def read_config(path):
    """predictor.json, checked for type and range: (categories, size, width, levels,
    other_categories); a file without other_categories (the first version) has none."""
    try:
        config = json.loads(Path(path).read_text())
        categories, size = config['categories'], config['size']
        width, levels = config['width'], config['levels']
        other_categories = config.get('other_categories', [])
        if not (
            isinstance(categories, list)
            and categories
            and isinstance(other_categories, list)
            and all(isinstance(c, str) and c for c in categories + other_categories)
            and len(set(categories + other_categories)) == len(categories + other_categories)
        ):
            raise ValueError('categories and other_categories must be distinct non-empty names')
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in [*size, width, levels]):
            raise ValueError('size, width and levels must be integers')
        if len(size) != 2 or not 1 <= width <= 1024 or not 1 <= levels <= 8:
            raise ValueError('size must be [H, W], width in [1, 1024], levels in [1, 8]')
        check_size(size, levels)
    except (OSError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f'{path}: not a mask predictor configuration ({error})') from None
    return tuple(categories), tuple(size), width, levels, tuple(other_categories)


def load_predictor(folder):
    """The predictor in `folder` (parameters.h5 and predictor.json, as train_masks.py and
    pretrained/mask_predictor hold them), its parameters loaded under SCOPE. Raises ValueError
    naming the file unless the parameters are exactly the network's, in names and shapes: a
    parameter left at its random start would predict noise without a word."""
    folder = Path(folder)
    categories, size, width, levels, other_categories = read_config(folder / CONFIG)
    file = folder / 'parameters.h5'
    try:
        saved = read_parameters(str(file))
    except Exception as error:  # h5py reports damage with several exception types
        reason = str(error).split('\n')[0]
        raise ValueError(
            f'{file}: unreadable or not a parameter file ({type(error).__name__}: {reason})'
        ) from None
    with nn.parameter_scope(SCOPE):
        nn.clear_parameters()  # a predictor loaded before keeps its own; this one starts afresh
    predictor = build_predictor(categories, size, width, levels, other_categories)
    with nn.parameter_scope(SCOPE):
        needed = {f'{SCOPE}/{name}': p for name, p in nn.get_parameters(grad_only=False).items()}
    for name in sorted(set(needed) | set(saved)):
        if name not in saved or name not in needed:
            what = 'lacks' if name not in saved else 'holds a parameter the network lacks:'
            raise ValueError(f'{file} {what} {name} (not the network of {folder / CONFIG})')
        if saved[name].shape != needed[name].shape:
            raise ValueError(f'{file}: {name} is {saved[name].shape}, the network needs {needed[name].shape}')
        needed[name].d = saved[name]
    return predictor


@dataclass
class CategoryMasks:
    """What predict_masks finds of a category: its bool region (H, W) at the photo's resolution
    and its instances (bool (H, W) each) by the ccp instance rule."""

    region: np.ndarray
    instances: list


def predict_labels(predictor, photo):
    """(H, W) class ids of a photo (H, W, 3) uint8 at its own resolution: c + 1 for
    predictor.categories[c], 0 elsewhere (background and the other categories)."""
    probabilities = predictor.class_probabilities(photo)
    # Every class that is not a category competes as one plane, its most likely one's: the
    # same argmax at network size, and few planes to bring to the photo's size.
    count = 1 + len(predictor.categories)
    rest = np.concatenate([probabilities[:1], probabilities[count:]]).max(axis=0, keepdims=True)
    planes = np.concatenate([rest, probabilities[1:count]])
    return resize_probabilities(planes, np.shape(photo)[:2]).argmax(axis=0)


def predict_masks(predictor, photo, split_instances=False, min_instance_area=0.002):
    """{category: CategoryMasks} of a photo (H, W, 3) uint8 of any size, for every category of
    the predictor. Without split_instances a present category is one instance (its region),
    as in generate_ccp_dataset.py by default; with it each 8-connected component covering at
    least min_instance_area of the photo is one. A category not found has an empty region and
    no instances."""
    labels = predict_labels(predictor, photo)
    found = {}
    for index, category in enumerate(predictor.categories, start=1):
        region = labels == index
        found[category] = CategoryMasks(
            region, ccp.instance_masks(region, split_instances, min_instance_area)
        )
    return found


# ---------------------------------------------------------------------------------------------
# Masks for a translation, shared by translate.py and evaluate.py

DEFAULT_FOLDER = str(Path(__file__).resolve().parent / 'pretrained' / 'mask_predictor')


class PredictorError(RunError):
    """A mask predictor folder that cannot serve; the message is one line naming it."""


def open_predictor(folder, categories, accelerate=None):
    """The predictor in `folder`, checked to know each of `categories` (the source categories
    of the translations to make); `accelerate` (runtime.device.set_context's) is applied to
    its graph."""
    try:
        predictor = load_predictor(folder)
    except ValueError as error:
        raise PredictorError(f'mask predictor {folder}: {error}') from None
    unknown = [category for category in categories if category not in predictor.categories]
    if unknown:
        raise PredictorError(
            f'mask predictor {folder} finds {", ".join(predictor.categories)}, not {", ".join(unknown)}'
        )
    if accelerate:
        accelerate(predictor.probabilities)
    return predictor


def source_instances(predictor, photo, category, split_instances=False, min_instance_area=0.002):
    """The instance masks (bool, the photo's size) of `category` in a photo (H, W, 3) uint8, by
    the instance rule of generate_ccp_dataset.py and its flags; empty if none is found."""
    return predict_masks(predictor, photo, split_instances, min_instance_area)[category].instances


def predicted_mask_names(stem, count):
    """NAME_mask_pred_K.png: the predicted masks written beside a translation of NAME."""
    return [f'{stem}_mask_pred_{index}.png' for index in range(count)]


def write_predicted_masks(folder, stem, masks):
    """The masks as predicted_mask_names in `folder`, 0/255 at the photo's size: what --masks
    reads, so that a user can correct them and translate again."""
    for name, mask in zip(predicted_mask_names(stem, len(masks)), masks):
        write_image(str(Path(folder) / name), np.where(mask, 255, 0).astype(np.uint8))


# ---------------------------------------------------------------------------------------------
# Measures


def intersection_and_union(predicted, annotated):
    """Pixel counts of the overlap and the union of two bool masks, to pool over photos."""
    predicted, annotated = np.asarray(predicted, bool), np.asarray(annotated, bool)
    return int(np.sum(predicted & annotated)), int(np.sum(predicted | annotated))


def iou(predicted, annotated):
    """Intersection over union of two bool masks (2-D arrays), or pooled over the pairs of
    two lists of them (photos of any sizes); 1.0 when all are empty, as nothing was missed and
    nothing invented."""
    single = isinstance(predicted, np.ndarray) and predicted.ndim == 2
    pairs = [(predicted, annotated)] if single else zip(predicted, annotated)
    overlap, union = np.sum([intersection_and_union(p, a) for p, a in pairs], axis=0)
    return 1.0 if union == 0 else overlap / union


def instance_count_accuracy(predicted_counts, annotated_counts):
    """Share of photos whose predicted instance count equals the annotated one."""
    predicted_counts, annotated_counts = np.asarray(predicted_counts), np.asarray(annotated_counts)
    if predicted_counts.shape != annotated_counts.shape or predicted_counts.size == 0:
        raise ValueError('instance counts: need as many predicted as annotated, at least one')
    return float(np.mean(predicted_counts == annotated_counts))


def boundary(mask):
    """The mask's pixels with a 4-neighbour outside it (the photo's edge counts as outside)."""
    mask = np.asarray(mask, bool)
    return mask & ~scipy.ndimage.binary_erosion(mask, border_value=0)


def boundary_f_score(predicted, annotated, tolerance=2):
    """Boundary F-score (Martin et al. 2004, as in DAVIS): precision is the share of the
    predicted boundary pixels within `tolerance` pixels (Euclidean) of the annotated boundary,
    recall the reverse, F their harmonic mean. 1.0 when both masks are empty, 0.0 when only
    one is."""
    predicted, annotated = boundary(predicted), boundary(annotated)
    if not predicted.any() and not annotated.any():
        return 1.0
    if not predicted.any() or not annotated.any():
        return 0.0
    # distance_transform_edt gives each nonzero pixel its distance to the nearest zero.
    to_annotated = scipy.ndimage.distance_transform_edt(~annotated)
    to_predicted = scipy.ndimage.distance_transform_edt(~predicted)
    precision = np.mean(to_annotated[predicted] <= tolerance)
    recall = np.mean(to_predicted[annotated] <= tolerance)
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))
