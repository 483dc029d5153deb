"""Unaligned image + instance-mask loading for InstaGAN.

A dataset folder holds, for each phase (train, val, ...) and domain (A, B):

    {phase}A/NAME.png                 an image (.png, .jpg, .jpeg or .bmp)
    {phase}A_seg/NAME_0.png, ...      its instance masks, numbered from 0 without gaps

MaskedImageIterator yields batches of one domain: images in [-1, 1] and a fixed number of
instance masks per image in [-1, 1] (1 inside, -1 outside, soft at the edges), resized,
cropped and flipped together. The two domains are
unaligned, so the caller runs one independent iterator per domain.
"""
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp')


class DataError(Exception):
    """A dataset file or folder is missing or unusable; the message is one line naming it."""


def _read_rgb(path):
    try:
        with Image.open(path) as image:
            return image.convert('RGB')  # decodes fully, so truncated files fail here
    except Exception as error:  # PIL reports corrupt files with many unrelated exception types
        raise DataError(f'{path}: unreadable image ({type(error).__name__}: {error})') from None


def _to_array(image):
    """PIL RGB image -> float32 (3, H, W) in [-1, 1]."""
    return np.asarray(image, np.float32).transpose(2, 0, 1) / 127.5 - 1


def load_image(path):
    """Any image file -> float32 (3, H, W) RGB in [-1, 1]."""
    return _to_array(_read_rgb(path))


def load_mask(path):
    """Any image file -> bool (H, W), True above half the file's maximum, so 0/1 and 0/255 work
    alike (the official code reads 0/255 files; this makes any other encoding equivalent)."""
    try:
        with Image.open(path) as mask:
            # Palette and colour masks are judged by luminance; single-band ones keep their raw
            # values because convert('L') would clip 16-bit masks.
            if mask.mode == 'P' or len(mask.getbands()) > 1:
                mask = mask.convert('L')
            values = np.asarray(mask)
    except Exception as error:  # PIL reports corrupt files with many unrelated exception types
        raise DataError(f'{path}: unreadable mask ({type(error).__name__}: {error})') from None
    return values > values.max() / 2  # an all-zero mask stays empty


def load_with_masks(image_path, mask_paths):
    """An image (PIL RGB) and its masks (bool (H, W) each, at the image's own size)."""
    image = _read_rgb(image_path)
    masks = [load_mask(path) for path in mask_paths]
    for path, mask in zip(mask_paths, masks):
        if mask.shape != (image.height, image.width):
            raise DataError(f'{path}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) '
                            f'but its image is {image.width}x{image.height}')
    return image, masks


def resize_with_masks(image, masks, size):
    """A PIL RGB image and its bool masks resized to size (H, W), both bicubically as the
    official code does: float32 (3, H, W) and (N, H, W), in [-1, 1]. The masks keep the soft
    edges the resize gives them (not binarised, as in the official pipeline)."""
    height, width = size
    resized = _to_array(image.resize((width, height), Image.BICUBIC))
    masks = np.stack([np.asarray(Image.fromarray(mask.astype(np.uint8) * 255)
                                 .resize((width, height), Image.BICUBIC), np.float32) / 127.5 - 1
                      for mask in masks]) if masks else np.zeros((0, height, width), np.float32)
    return resized, masks


def load_resized(image_path, mask_paths, size):
    """resize_with_masks of an image file and its mask files; also returns the image's own
    (H, W)."""
    image, masks = load_with_masks(image_path, mask_paths)
    return (*resize_with_masks(image, masks, size), (image.height, image.width))


def mask_areas(masks):
    """(N, H, W) masks in [-1, 1] -> (N,) areas in pixels, soft edges counted by their value."""
    return ((masks + 1) / 2).sum(axis=(1, 2))


def mask_paths(image_path):
    """Instance masks of DIR/NAME.ext: DIR_seg/NAME_0.png, NAME_1.png, ... up to the first gap."""
    image_path = Path(image_path)
    seg_folder = image_path.parent.with_name(image_path.parent.name + '_seg')
    paths = []
    while (path := seg_folder / f'{image_path.stem}_{len(paths)}.png').exists():
        paths.append(path)
    return paths


def list_images(folder):
    """The images of a domain folder, sorted. Two images of one name (a.png, a.jpg) would share
    the masks a_0.png, ...: refused, naming both."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f'{folder}: folder not found')
    paths = sorted(path for path in folder.iterdir()
                   if path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith('.'))
    if not paths:
        raise DataError(f'{folder}: no images ({", ".join(IMAGE_EXTENSIONS)})')
    first_of_stem = {}
    for path in paths:
        first = first_of_stem.setdefault(path.stem, path)
        if first != path:
            raise DataError(f'{first} and {path}: two images named {path.stem}, which would '
                            f'share the masks {path.stem}_0.png, ...; rename one')
    return paths


def count_max_instances(dataroot, phase='train'):
    """Largest number of instance masks of any image in {phase}A or {phase}B (reads no pixels)."""
    return max(len(mask_paths(path))
               for domain in 'AB' for path in list_images(Path(dataroot) / f'{phase}{domain}'))


class MaskedImageIterator:
    """Endless shuffled batches of (images, masks) from {dataroot}/{phase}{domain}.

    images: float32 (B, 3, fine_h, fine_w) in [-1, 1]; masks: float32 (B, ins_max, fine_h, fine_w)
    with 1 inside an instance and -1 elsewhere, soft at the edges. Each image and its masks are resized to
    load_size, randomly cropped to fine_size and randomly flipped, all with the same window.
    Instances are sorted by decreasing area inside the crop (or shuffled with set_order='random'),
    cut to ins_max and padded with empty masks. Sizes are (H, W).

    All randomness comes from one RandomState drawn in the calling thread, so a seed fixes
    every batch; worker threads only decode and resize, one batch ahead of the caller.
    """

    def __init__(self, dataroot, phase, domain, batch_size, load_size=(330, 220),
                 fine_size=(300, 200), ins_max=4, flip=True, set_order='decreasing', seed=0):
        if domain not in ('A', 'B'):
            raise ValueError(f"domain must be 'A' or 'B', not {domain!r}")
        if set_order not in ('decreasing', 'random'):
            raise ValueError(f"set_order must be 'decreasing' or 'random', not {set_order!r}")
        if batch_size < 1 or ins_max < 1:
            raise ValueError(f'batch_size {batch_size} and ins_max {ins_max} must be at least 1')
        if not all(0 < fine <= load for fine, load in zip(fine_size, load_size)):
            raise ValueError(f'fine_size {tuple(fine_size)} must be positive and fit in '
                             f'load_size {tuple(load_size)} (both (H, W))')
        dataroot = Path(dataroot)
        if not dataroot.is_dir():
            raise DataError(f'{dataroot}: dataset folder not found')
        folder = dataroot / f'{phase}{domain}'
        self.image_paths = list_images(folder)
        self.mask_paths = [mask_paths(path) for path in self.image_paths]
        for image_path, masks in zip(self.image_paths, self.mask_paths):
            if not masks:
                raise DataError(f'{image_path}: no instance mask '
                                f'(expected {folder}_seg/{image_path.stem}_0.png)')
        claimed = {path for masks in self.mask_paths for path in masks}
        for path in sorted(Path(f'{folder}_seg').glob('*.png')):
            if path not in claimed:
                raise DataError(f'{path}: mask without an image in {folder} '
                                '(or a gap in its NAME_0, NAME_1, ... numbering)')

        self.size, self.batch_size = len(self.image_paths), batch_size
        self.load_size, self.fine_size = tuple(load_size), tuple(fine_size)
        self.ins_max, self.flip, self.set_order = ins_max, flip, set_order
        self._rng = np.random.RandomState(seed)
        self._order = np.arange(0)  # image indices of the current pass; empty forces a reshuffle
        self._cursor = 0  # position in self._order
        self._pending = None  # (state before planning, futures) of the batch next() returns
        self._pool = ThreadPoolExecutor(max_workers=2)

    def next(self):
        if self._pending is None:
            self._pending = self._submit()
        _, futures = self._pending
        self._pending = self._submit()  # decode the following batch while the caller trains
        images, masks = zip(*(future.result() for future in futures))
        return np.stack(images), np.stack(masks)

    def get_state(self):
        """Picklable position; after set_state(state), next() returns the batch it would now."""
        return self._pending[0] if self._pending else self._state()

    def set_state(self, state):
        self._cancel_pending()
        self._rng.set_state(state['rng'])
        self._order, self._cursor = np.array(state['order']), state['cursor']

    def close(self):
        self._cancel_pending()
        self._pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _state(self):
        return {'rng': self._rng.get_state(), 'order': self._order.copy(), 'cursor': self._cursor}

    def _cancel_pending(self):
        if self._pending:
            for future in self._pending[1]:
                future.cancel()
        self._pending = None

    def _submit(self):
        """Plan the next batch here, from the rng, and hand only the decoding to the workers."""
        state = self._state()  # taken before planning, so get_state() points at this batch
        (load_h, load_w), (fine_h, fine_w) = self.load_size, self.fine_size
        futures = []
        for _ in range(self.batch_size):
            if self._cursor == len(self._order):
                self._order, self._cursor = self._rng.permutation(self.size), 0
            index = self._order[self._cursor]
            self._cursor += 1
            top = self._rng.randint(load_h - fine_h + 1)
            left = self._rng.randint(load_w - fine_w + 1)
            flip = self.flip and self._rng.rand() < 0.5
            set_order = (self._rng.permutation(len(self.mask_paths[index]))
                         if self.set_order == 'random' else None)
            futures.append(self._pool.submit(self._load, index, top, left, flip, set_order))
        return state, futures

    def _load(self, index, top, left, flip, set_order):
        """One (image, masks) sample; set_order None means decreasing area."""
        image, masks, _ = load_resized(self.image_paths[index], self.mask_paths[index],
                                    self.load_size)
        fine_h, fine_w = self.fine_size
        rows, cols = slice(top, top + fine_h), slice(left, left + fine_w)
        image, masks = image[:, rows, cols], masks[:, rows, cols]
        if flip:
            image, masks = image[:, :, ::-1], masks[:, :, ::-1]
        if set_order is None:  # largest first, ties in file order
            set_order = np.argsort(-mask_areas(masks), kind='stable')
        kept = masks[set_order[:self.ins_max]]
        padded = np.full((self.ins_max, fine_h, fine_w), -1, np.float32)
        padded[:len(kept)] = kept
        return np.ascontiguousarray(image), np.ascontiguousarray(padded)
