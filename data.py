"""Unaligned image + instance-mask loading for InstaGAN.

A dataset folder holds, for each phase (train, val, ...) and domain (A, B):

    {phase}A/NAME.png                 an image (.png, .jpg, .jpeg or .bmp)
    {phase}A_seg/NAME_0.png, ...      its instance masks, numbered from 0 without gaps

MaskedImageIterator yields batches of one domain: images in [-1, 1] and a fixed number of
instance masks per image in [-1, 1] (1 inside, -1 outside, soft at the edges), resized,
cropped and flipped together; Loaders holds the two unaligned domains of a training set.

Every image is read by read_photo and every mask by load_mask, through read_pixels, whose rules
cover every kind of pixel a file can hold, by its Pillow mode:

    1, L, LA, P, RGB, RGBA        decoded by imageio: bool or uint8, grey or colour, with alpha
    I;16 (16-bit grey PNG)        decoded by imageio as uint16; a photo is scaled to 8 bits
    16-bit RGB(A), LA             Pillow keeps the high byte of each value (scaled, not clipped)
    CMYK (JPEG)                   converted to RGB by Pillow: imageio returns the ink values
    a transparent colour (tRNS)   converted to RGBA by Pillow: imageio drops that transparency,
                                  and a mask may be drawn in it
    anything else                 refused in one line: I (32-bit integer) and F (float) hold
                                  values of no fixed scale, LAB and the like are no RGB
(Files are recognised by their content, whatever their extension.) Pillow also resizes.
Whatever the path, the pixels are then turned upright by the file's EXIF orientation, as
viewers show them (and as a mask is drawn on the shown photo): ImageOps.exif_transpose's result.
"""

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
from nnabla.logger import logger
from PIL import Image
from tqdm import tqdm

from runtime import RunError

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp')


class DataError(RunError):
    """A dataset file or folder is missing or unusable; the message is one line naming it."""


# The modes imageio decodes as the rules above read them, and those Pillow converts first.
DECODED_MODES = {'1', 'L', 'LA', 'P', 'RGB', 'RGBA', 'I;16', 'I;16B', 'I;16L'}
CONVERTED_MODES = {'CMYK': 'RGB', 'PA': 'RGBA'}
KEYED_MODES = {'L', 'P', 'RGB'}  # with a transparent colour: converted to RGBA
READ_MODES = DECODED_MODES | set(CONVERTED_MODES)

ORIENTATION = 0x0112  # the EXIF tag
# How each orientation turns the stored pixels (H, W, C) upright, as (swap the axes, then reverse
# the rows, reverse the columns): 2 flips left-right, 3 turns 180, 4 flips top-bottom,
# 5 transposes, 6 turns 90 clockwise, 7 transverses, 8 turns 90 counter-clockwise.
UPRIGHT = {
    1: (False, False, False),
    2: (False, False, True),
    3: (False, True, True),
    4: (False, True, False),
    5: (True, False, False),
    6: (True, False, True),
    7: (True, True, True),
    8: (True, True, False),
}


def upright(pixels, orientation):
    """Stored pixels (H, W, C) as the EXIF `orientation` says they are shown."""
    swap, rows, columns = UPRIGHT[orientation]
    if swap:
        pixels = pixels.swapaxes(0, 1)
    return pixels[:: -1 if rows else 1, :: -1 if columns else 1]


def read_pixels(path, kind):
    """The decoded pixels of an image file (see the table above), upright: bool, uint8 or uint16
    (H, W, C), C = 1 (grey), 2 (grey, alpha), 3 (RGB) or 4 (RGBA)."""
    try:
        with Image.open(path) as image:  # reads the header; convert() decodes
            mode = image.mode
            if mode in CONVERTED_MODES:
                pixels = np.asarray(image.convert(CONVERTED_MODES[mode]))
            elif mode in KEYED_MODES and 'transparency' in image.info:
                pixels = np.asarray(image.convert('RGBA'))
            elif mode in DECODED_MODES:
                pixels = imageio.imread(path)  # stored as is: imageio.v2 leaves the orientation
            # A PNG's EXIF sits before its pixels; asking Pillow for it otherwise decodes them again.
            if mode in READ_MODES and (image.format != 'PNG' or 'exif' in image.info):
                orientation = image.getexif().get(ORIENTATION, 1)
            else:
                orientation = 1
    except Exception as error:  # the decoders report damage with many exception types
        reason = str(error).split('\n')[0]
        raise DataError(f'{path}: unreadable {kind} ({type(error).__name__}: {reason})') from None
    if mode not in READ_MODES:
        raise DataError(
            f'{path}: the {kind} is in Pillow mode {mode}, which holds no RGB or '
            'grey values of a known scale; save it as an 8-bit or 16-bit grey, RGB '
            'or RGBA PNG'
        )
    if (
        pixels.dtype not in (bool, np.uint8, np.uint16)
        or pixels.ndim not in (2, 3)
        or (pixels.ndim == 3 and pixels.shape[2] not in (1, 2, 3, 4))
    ):
        raise DataError(
            f'{path}: the {kind} holds {pixels.dtype} values in {pixels.shape}, '
            'which are not supported; save it as an 8-bit or 16-bit grey, RGB or RGBA PNG'
        )
    # Values outside 1..8 mean nothing: exif_transpose and viewers show such a file as stored, so
    # reading it as stored matches the shown photo, where a refusal would stop on a good file.
    if orientation not in UPRIGHT:
        orientation = 1
    return np.ascontiguousarray(upright(pixels if pixels.ndim == 3 else pixels[:, :, None], orientation))


def to_uint8(values):
    if values.dtype == bool:
        return values.astype(np.uint8) * 255
    if values.dtype == np.uint16:
        return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    return values


def read_photo(path):
    """An image file as uint8 (H, W, 3) RGB: grey is repeated, transparency dropped, 16-bit
    values scaled to 8 bits."""
    pixels = to_uint8(read_pixels(path, 'image'))
    colour = pixels[:, :, :3] if pixels.shape[2] >= 3 else pixels[:, :, :1]
    return np.ascontiguousarray(np.broadcast_to(colour, colour.shape[:2] + (3,)))


def load_image(path):
    """An image file -> float32 (3, H, W) RGB in [-1, 1]."""
    return read_photo(path).transpose(2, 0, 1).astype(np.float32) / 127.5 - 1


def load_mask(path):
    """A mask file -> bool (H, W). A pixel is on where its value is above half the largest
    value in the file, so 0/1, 0/255 and 16-bit masks read alike and an all-zero one is empty.
    Colour masks are judged by their brightest channel. With transparency, the mask is drawn in
    whichever of colour and alpha varies; where both vary they must agree."""
    pixels = read_pixels(path, 'mask').astype(np.float64)
    colour = pixels[:, :, :3].max(axis=2) if pixels.shape[2] >= 3 else pixels[:, :, 0]
    planes = [colour]
    if pixels.shape[2] in (2, 4):
        planes.append(pixels[:, :, -1])
    varying = [plane > plane.max() / 2 for plane in planes if plane.max() > plane.min()]
    if not varying:  # one value everywhere: on unless black or transparent
        return np.full(colour.shape, all(plane.max() > 0 for plane in planes))
    if len(varying) == 2 and not np.array_equal(*varying):
        raise DataError(
            f'{path}: its colour and its transparency draw different masks; save '
            'the mask in one of them (white instance on black, opaque)'
        )
    return varying[0]


def load_with_masks(image_path, mask_paths):
    """An image (uint8 (H, W, 3)) and its masks (bool (H, W) each, at the image's own size)."""
    image = read_photo(image_path)
    masks = [load_mask(path) for path in mask_paths]
    for path, mask in zip(mask_paths, masks):
        if mask.shape != image.shape[:2]:
            raise DataError(
                f'{path}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) '
                f'but its image is {image.shape[1]}x{image.shape[0]}'
            )
    return image, masks


RESAMPLING = {'bicubic': Image.BICUBIC, 'bilinear': Image.BILINEAR, 'box': Image.BOX}


def resize(array, size, method='bicubic'):
    """uint8 (H, W[, C]) or float32 (H, W) resized to size (H, W) by Pillow (imageio does not
    resize)."""
    return np.asarray(Image.fromarray(array).resize((size[1], size[0]), RESAMPLING[method]))


def resize_with_masks(image, masks, size):
    """A uint8 RGB image and its bool masks resized to size (H, W), both bicubically as the
    official code does: float32 (3, H, W) and (N, H, W), in [-1, 1]. The masks keep the soft
    edges the resize gives them (not binarised, as in the official pipeline)."""
    resized = resize(image, size).transpose(2, 0, 1).astype(np.float32) / 127.5 - 1
    masks = (
        np.stack([resize(mask.astype(np.uint8) * 255, size).astype(np.float32) / 127.5 - 1 for mask in masks])
        if masks
        else np.zeros((0,) + tuple(size), np.float32)
    )
    return resized, masks


def load_resized(image_path, mask_paths, size):
    """resize_with_masks of an image file and its mask files; also returns the image's own
    (H, W)."""
    image, masks = load_with_masks(image_path, mask_paths)
    return (*resize_with_masks(image, masks, size), image.shape[:2])


def dataset_folder(path):
    """(folder, what it is) if `path` is or lies in a folder of a dataset, else None: a mask
    folder (NAME_seg) or an image folder (one beside NAME_seg)."""
    path = Path(os.path.realpath(path))
    for folder in [path, *path.parents]:
        if folder.name.endswith('_seg'):
            return folder, "a dataset's mask folder"
        if folder.name and folder.with_name(folder.name + '_seg').is_dir():
            return folder, f"a dataset's image folder (beside {folder}_seg)"
    return None


def check_not_in_dataset(path, flag):
    """Refuse an output folder that would mix a program's files into a dataset."""
    found = dataset_folder(path)
    if found:
        folder, what = found
        inside = '' if folder == Path(os.path.realpath(path)) else f' lies in {folder}, which'
        raise DataError(f'{flag} {path}{inside} is {what}; choose another folder')


def check_out_folder(out, files_read, folders):
    """Refuse, before anything is written, an --out that could overwrite an input or mix the
    outputs into a dataset: the folder of a file read, one of `folders` ({flag: path}), a file,
    or a folder of a dataset. Symlinks and relative paths are resolved first."""
    real = os.path.realpath(out)
    refusals = [(os.path.dirname(os.path.realpath(path)), f'holds the input {path}') for path in files_read]
    refusals += [(os.path.realpath(path), f'is the {flag} folder') for flag, path in folders.items() if path]
    for folder, reason in refusals:
        if folder == real:
            raise DataError(f'--out {out} {reason}; choose another folder')
    check_not_in_dataset(out, '--out')
    if os.path.exists(real) and not os.path.isdir(real):
        raise DataError(f'--out {out} is a file')


def mask_areas(masks):
    """(N, H, W) masks in [-1, 1] -> (N,) areas in pixels, soft edges counted by their value."""
    return ((masks + 1) / 2).sum(axis=(1, 2))


def largest_first(masks):
    """The order of (N, H, W) masks by decreasing area, ties in file order: the slot order of
    training and translation alike."""
    return np.argsort(-mask_areas(masks), kind='stable')


def mask_paths(image_path):
    """Instance masks of DIR/NAME.ext: DIR_seg/NAME_0.png, NAME_1.png, ... up to the first gap."""
    image_path = Path(image_path)
    seg_folder = image_path.parent.with_name(image_path.parent.name + '_seg')
    paths = []
    while (path := seg_folder / f'{image_path.stem}_{len(paths)}.png').is_file():
        paths.append(path)
    return paths


def is_listed(path):
    """Files a dataset folder lists: images, not hidden ones (such as macOS's ._NAME.png)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith('.') and path.is_file()


def list_images(folder):
    """The images of a domain folder, sorted. Two images of one name (a.png, a.jpg) would share
    the masks a_0.png, ...: refused, naming both."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f'{folder}: folder not found')
    paths = sorted(path for path in folder.iterdir() if is_listed(path))
    if not paths:
        raise DataError(f'{folder}: no images ({", ".join(IMAGE_EXTENSIONS)})')
    first_of_stem = {}
    for path in paths:
        first = first_of_stem.setdefault(path.stem, path)
        if first != path:
            raise DataError(
                f'{first} and {path}: two images named {path.stem}, which would '
                f'share the masks {path.stem}_0.png, ...; rename one'
            )
    return paths


def count_max_instances(dataroot, phase='train'):
    """Largest number of instance masks of any image in {phase}A or {phase}B (reads no pixels)."""
    return max(
        len(mask_paths(path)) for domain in 'AB' for path in list_images(Path(dataroot) / f'{phase}{domain}')
    )


class MaskedImageIterator:
    """Endless shuffled batches of (images, masks) from {dataroot}/{phase}{domain}.

    images: float32 (B, 3, fine_h, fine_w) in [-1, 1]; masks: float32 (B, ins_max, fine_h,
    fine_w) with 1 inside an instance and -1 elsewhere, soft at the edges. Each image and its
    masks are resized to load_size, randomly cropped to fine_size and randomly flipped, all with
    the same window. Instances are sorted by decreasing area inside the crop (or shuffled with
    set_order='random'), cut to ins_max and padded with empty masks. Sizes are (H, W).

    The order comes from a RandomState of `seed`; the crop and flip of the j-th sample of the
    k-th batch from `transform_seed`, k and j alone, so that iterators given the same
    transform_seed (the two domains of a run) crop and flip their k-th batches alike, as the
    official loader does with its one seed per iteration. Everything is drawn in the calling
    thread; worker threads only decode and resize, one batch ahead of the caller.

    share (rank, ranks): under data parallelism every rank draws the same global batches of
    ranks x batch_size samples and keeps its own disjoint part, so that the order, the state
    and a resume are the same whatever the number of ranks.
    """

    def __init__(
        self,
        dataroot,
        phase,
        domain,
        batch_size,
        load_size=(330, 220),
        fine_size=(300, 200),
        ins_max=4,
        flip=True,
        set_order='decreasing',
        seed=0,
        transform_seed=None,
        share=(0, 1),
    ):
        if domain not in ('A', 'B'):
            raise ValueError(f"domain must be 'A' or 'B', not {domain!r}")
        if set_order not in ('decreasing', 'random'):
            raise ValueError(f"set_order must be 'decreasing' or 'random', not {set_order!r}")
        if batch_size < 1 or ins_max < 1:
            raise ValueError(f'batch_size {batch_size} and ins_max {ins_max} must be at least 1')
        if not all(0 < fine <= load for fine, load in zip(fine_size, load_size)):
            raise ValueError(
                f'fine_size {tuple(fine_size)} must be positive and fit in '
                f'load_size {tuple(load_size)} (both (H, W))'
            )
        dataroot = Path(dataroot)
        if not dataroot.is_dir():
            raise DataError(f'{dataroot}: dataset folder not found')
        self.folder = dataroot / f'{phase}{domain}'
        self.image_paths = list_images(self.folder)
        self.mask_paths = [mask_paths(path) for path in self.image_paths]
        for image_path, masks in zip(self.image_paths, self.mask_paths):
            if not masks:
                raise DataError(
                    f'{image_path}: no instance mask (expected {self.folder}_seg/{image_path.stem}_0.png)'
                )
        claimed = {path for masks in self.mask_paths for path in masks}
        for path in sorted(Path(f'{self.folder}_seg').iterdir()):
            if is_listed(path) and path not in claimed:
                raise DataError(
                    f'{path}: mask without an image in {self.folder} '
                    '(or a gap in its NAME_0, NAME_1, ... numbering)'
                )

        self.size, self.batch_size = len(self.image_paths), batch_size
        self.load_size, self.fine_size = tuple(load_size), tuple(fine_size)
        self.ins_max, self.flip, self.set_order = ins_max, flip, set_order
        self.rank, self.ranks = share
        self._rng = np.random.RandomState(seed)
        self._transform_seed = seed if transform_seed is None else transform_seed
        self._batches = 0  # batches planned so far
        self._order = np.arange(0)  # image indices of the current pass; empty forces a reshuffle
        self._cursor = 0  # position in self._order
        self._pending = None  # (state before planning, futures) of the batch next() returns
        self._pool = ThreadPoolExecutor(max_workers=2)

    def fingerprint(self):
        """A digest of the file names (images and masks) this iterator reads."""
        names = [
            str(path.relative_to(self.folder.parent))
            for image, masks in zip(self.image_paths, self.mask_paths)
            for path in [image] + masks
        ]
        return hashlib.sha256('\n'.join(names).encode()).hexdigest()[:16]

    def next(self):
        if self._pending is None:
            self._pending = self._submit()
        _, futures = self._pending
        self._pending = self._submit()  # decode the following batch while the caller trains
        images, masks = zip(*(future.result() for future in futures))
        return np.stack(images), np.stack(masks)

    def get_state(self):
        """The position as JSON-able values and arrays; after set_state(state), next() returns
        the batch it would now."""
        return self._pending[0] if self._pending else self._state()

    def set_state(self, state):
        """Raises ValueError unless `state` is a position of this iterator's images."""
        order, cursor = np.asarray(state['order']), state['cursor']
        batches, transform_seed = state['batches'], state['transform_seed']
        if (
            order.dtype.kind not in 'iu'
            or order.ndim != 1
            or not all(type(v) is int for v in (cursor, batches, transform_seed))
            or not 0 <= cursor <= len(order)
            or batches < 0
            or transform_seed < 0
            or len(order) not in (0, self.size)
            or (len(order) and (sorted(order.tolist()) != list(range(self.size))))
        ):
            raise ValueError(
                f'a loader position of order {order.shape}, cursor {cursor!r}, '
                f'batch {batches!r} does not fit {self.size} images'
            )
        self._cancel_pending()
        self._rng.set_state(tuple(state['rng']))
        self._order, self._cursor = order, cursor
        self._batches, self._transform_seed = batches, transform_seed

    def close(self):
        self._cancel_pending()
        self._pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _state(self):
        return {
            'rng': self._rng.get_state(),
            'order': self._order.copy(),
            'cursor': self._cursor,
            'batches': self._batches,
            'transform_seed': self._transform_seed,
        }

    def _cancel_pending(self):
        if self._pending:
            for future in self._pending[1]:
                future.cancel()
        self._pending = None

    def _submit(self):
        """Plan the next batch here and hand only the decoding to the workers."""
        state = self._state()  # taken before planning, so get_state() points at this batch
        (load_h, load_w), (fine_h, fine_w) = self.load_size, self.fine_size
        futures = []
        for j in range(self.batch_size * self.ranks):
            if self._cursor == len(self._order):
                self._order, self._cursor = self._rng.permutation(self.size), 0
            index = self._order[self._cursor]
            self._cursor += 1
            set_order = (
                self._rng.permutation(len(self.mask_paths[index])) if self.set_order == 'random' else None
            )
            if j // self.batch_size != self.rank:
                continue
            transform = np.random.RandomState([self._transform_seed, self._batches, j])
            top = transform.randint(load_h - fine_h + 1)
            left = transform.randint(load_w - fine_w + 1)
            flip = self.flip and transform.rand() < 0.5
            futures.append(self._pool.submit(self._load, index, top, left, flip, set_order))
        self._batches += 1
        return state, futures

    def _load(self, index, top, left, flip, set_order):
        """One (image, masks) sample; set_order None means largest first."""
        image, masks, _ = load_resized(self.image_paths[index], self.mask_paths[index], self.load_size)
        fine_h, fine_w = self.fine_size
        rows, cols = slice(top, top + fine_h), slice(left, left + fine_w)
        image, masks = image[:, rows, cols], masks[:, rows, cols]
        if flip:
            image, masks = image[:, :, ::-1], masks[:, :, ::-1]
        if set_order is None:
            set_order = largest_first(masks)
        kept = masks[set_order[: self.ins_max]]
        padded = np.full((self.ins_max, fine_h, fine_w), -1, np.float32)
        padded[: len(kept)] = kept
        return np.ascontiguousarray(image), np.ascontiguousarray(padded)


def loader_memory(batch_size, load_size, fine_size, ins_max, most_instances):
    """Bytes two domains' iterators hold at most, from the sizes: each a batch returned and
    one being decoded, of an image and ins_max masks at fine_size (H, W); and the two workers
    resizing one image with all its masks (most_instances at most) at load_size, in uint8 and
    float32 with a copy each."""
    batches = 2 * 2 * batch_size * (3 + ins_max) * fine_size[0] * fine_size[1] * 4
    workers = 2 * (3 + most_instances) * load_size[0] * load_size[1] * (1 + 2 * 4)
    return batches + workers


def check_dataroot(dataroot):
    if not os.path.isdir(dataroot):
        raise DataError(f'{dataroot}: dataset folder not found (datasets/generate_ccp_dataset.py makes one)')


class Loaders:
    """The two domains of a training set ('x' reads trainA, 'y' trainB), each in its own
    shuffled order, the k-th batches of both cropped and flipped alike. `ins_max` is capped at
    the most instances any image has."""

    def __init__(
        self, dataroot, batch_size, load_size, fine_size, ins_max, flip, set_order, seed, share=(0, 1)
    ):
        check_dataroot(dataroot)
        self.most_instances = count_max_instances(dataroot, 'train')
        self.ins_max = min(ins_max, self.most_instances)
        self.domains = {}
        try:
            for i, (domain, letter) in enumerate([('x', 'A'), ('y', 'B')]):
                self.domains[domain] = MaskedImageIterator(
                    dataroot,
                    'train',
                    letter,
                    batch_size,
                    load_size,
                    fine_size,
                    self.ins_max,
                    flip,
                    set_order,
                    seed=seed + i,
                    transform_seed=seed,
                    share=share,
                )
        except BaseException:
            self.close()
            raise
        for loader in self.domains.values():
            if batch_size * share[1] > loader.size:  # the order's next pass starts in the batch
                logger.warning(
                    f'--batch-size {batch_size} is larger than the {loader.size} images of '
                    f'{loader.folder}: each of its batches repeats images'
                )
        self.dataroot = dataroot

    def memory(self):
        """Bytes the loaders need at most (data.loader_memory)."""
        loader = self.domains['x']
        return loader_memory(
            loader.batch_size, loader.load_size, loader.fine_size, self.ins_max, self.most_instances
        )

    @classmethod
    def of(cls, args, share=(0, 1)):
        """The loaders that train.py's flags (args.py) describe; `share` as MaskedImageIterator's."""
        return cls(
            args.dataroot,
            args.batch_size,
            (args.loadSizeH, args.loadSizeW),
            (args.fineSizeH, args.fineSizeW),
            args.ins_max,
            not args.no_flip,
            args.set_order,
            args.seed,
            share=share,
        )

    def next_batches(self):
        """({domain: images}, {domain: masks}) of the next batch of both domains."""
        batches = {d: loader.next() for d, loader in self.domains.items()}
        return {d: b[0] for d, b in batches.items()}, {d: b[1] for d, b in batches.items()}

    @property
    def sizes(self):
        return {d: loader.size for d, loader in self.domains.items()}

    def identity(self):
        """What names the dataset in a checkpoint: its resolved path, and per domain the image
        count, the instance slots and a fingerprint of the file names."""
        return {
            'path': os.path.realpath(self.dataroot),
            'ins_max': self.ins_max,
            'domains': {
                d: {'folder': loader.folder.name, 'images': loader.size, 'fingerprint': loader.fingerprint()}
                for d, loader in self.domains.items()
            },
        }

    def verify(self):
        """Decode every image and mask once, before anything is written, so that a corrupt file
        stops the run now and not epochs later; and refuse a domain without a single non-empty
        mask, which would train nothing. (Every rank checks the whole dataset: the shares
        change every epoch.)"""

        def instances(image_path, mask_paths, size):
            _, masks, _ = load_resized(image_path, mask_paths, size)
            return int(np.sum(masks.max(axis=(1, 2)) > -1))

        workers = ThreadPoolExecutor(max_workers=2)
        try:
            for loader in self.domains.values():
                found = 0
                with tqdm(
                    total=loader.size,
                    desc=f'checking {loader.folder}',
                    leave=False,
                    dynamic_ncols=True,
                    disable=None,
                ) as progress:
                    for count in workers.map(
                        instances, loader.image_paths, loader.mask_paths, [loader.load_size] * loader.size
                    ):
                        found += count
                        progress.update()
                if not found:
                    raise DataError(
                        f'{loader.folder}_seg: every mask is empty, so '
                        f'{loader.folder} has no instance to translate'
                    )
        finally:
            workers.shutdown(cancel_futures=True)

    def state_dict(self):
        return {d: loader.get_state() for d, loader in self.domains.items()}

    def load_state_dict(self, state):
        for d, loader in self.domains.items():
            loader.set_state(state[d])

    def close(self):
        for loader in self.domains.values():
            loader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
