"""data.py: mask loading, crop/flip alignment, instance order, determinism, resuming, errors."""

import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from data import (
    DataError,
    Loaders,
    MaskedImageIterator,
    count_max_instances,
    load_image,
    load_mask,
    load_with_masks,
    mask_paths,
    read_photo,
)

SAMPLE = Path(__file__).resolve().parents[1] / 'datasets' / 'ccp_sample'
MULTI_SAMPLE = SAMPLE.with_name('ccp_multi_sample')


def save_example(root, folder, name, image, masks):
    """Write image (H, W, 3 uint8) to root/folder/name.png and its bool masks to root/folder_seg."""
    (root / folder).mkdir(parents=True, exist_ok=True)
    (root / f'{folder}_seg').mkdir(exist_ok=True)
    Image.fromarray(image).save(root / folder / f'{name}.png')
    for index, mask in enumerate(masks):
        Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(
            root / f'{folder}_seg' / f'{name}_{index}.png'
        )


def iterator_a(root, batch_size=1, **options):
    return MaskedImageIterator(root, 'train', 'A', batch_size, **options)


def batches(iterator, count):
    return [iterator.next() for _ in range(count)]


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for (images, masks), (other_images, other_masks) in zip(first, second):
        np.testing.assert_array_equal(images, other_images)
        np.testing.assert_array_equal(masks, other_masks)


def to_uint8(image):
    """Undo the [-1, 1] scaling of a (3, H, W) image."""
    return np.rint((image + 1) * 127.5).astype(int)


def coordinate_image(height, width):
    """Red = 7 * row, green = 9 * column: every pixel says where it came from."""
    rows, cols = np.mgrid[:height, :width]
    return np.stack([rows * 7, cols * 9, np.zeros_like(rows)], axis=-1).astype(np.uint8)


@pytest.fixture
def blobs(tmp_path):
    """Five 64x48 images whose red channel is a 0/255 blob pattern, which is also their mask."""
    rng = np.random.RandomState(0)
    for index in range(5):
        pattern = np.kron(rng.rand(16, 12) > 0.5, np.ones((4, 4), bool))
        image = rng.randint(0, 256, (64, 48, 3)).astype(np.uint8)
        image[..., 0] = np.where(pattern, 255, 0)
        save_example(tmp_path, 'trainA', f'{index:02d}', image, [pattern])
    return tmp_path


def blob_iterator(root, **options):
    return iterator_a(root, batch_size=3, load_size=(32, 24), fine_size=(28, 20), **options)


@pytest.fixture
def three_instances(tmp_path):
    """One 10x10 image with instances of 20, 60 and 10 px, in that file order."""
    masks = np.zeros((3, 10, 10), bool)
    masks[0, :2], masks[1, 2:8], masks[2, 8, :] = True, True, True
    save_example(tmp_path, 'trainA', 'sets', np.zeros((10, 10, 3), np.uint8), masks)
    return tmp_path


def test_crop_and_flip_keep_mask_on_image(blobs):
    for seed in range(20):
        with blob_iterator(blobs, seed=seed, ins_max=2) as iterator:
            for images, masks in batches(iterator, 2):
                assert images.shape == (3, 3, 28, 20) and masks.shape == (3, 2, 28, 20)
                # Image and mask are resized with the same filter, so red > 0 is exactly the mask.
                np.testing.assert_array_equal(masks[:, 0] > 0, images[:, 0] > 0)
                assert (masks[:, 1] == -1).all()


def test_crop_windows_and_flips_vary(tmp_path):
    save_example(tmp_path, 'trainA', 'grid', coordinate_image(10, 8), [np.ones((10, 8), bool)])
    windows = set()
    for seed in range(40):
        with iterator_a(tmp_path, load_size=(10, 8), fine_size=(7, 6), seed=seed) as iterator:
            image = to_uint8(iterator.next()[0][0])
        rows, cols = image[0] // 7, image[1] // 9
        flipped = cols[0, 0] > cols[0, -1]
        top, left = rows[0, 0], cols[0].min()
        np.testing.assert_array_equal(rows, np.arange(top, top + 7)[:, None].repeat(6, axis=1))
        expected_cols = np.arange(left, left + 6)
        np.testing.assert_array_equal(cols[0], expected_cols[::-1] if flipped else expected_cols)
        windows.add((top, left, flipped))
    assert {flipped for *_, flipped in windows} == {False, True}
    assert len({(top, left) for top, left, _ in windows}) > 6


def window(image):
    """(top, left, flipped) of a crop of coordinate_image, from its pixels."""
    rows, cols = to_uint8(image)[0] // 7, to_uint8(image)[1] // 9
    return int(rows[0, 0]), int(cols[0].min()), bool(cols[0, 0] > cols[0, -1])


def test_the_two_domains_batches_share_crop_and_flip(tmp_path):
    """As in the official loader, which draws one transform per iteration: the k-th batches
    of A and B are cropped and flipped alike, sample by sample, whatever images they hold."""
    for letter, count in [('A', 3), ('B', 5)]:
        for i in range(count):
            save_example(
                tmp_path,
                f'train{letter}',
                f'{letter}{i}',
                coordinate_image(20, 16),
                [np.ones((20, 16), bool)],
            )
    seen = []
    with Loaders(tmp_path, 2, (20, 16), (12, 8), 1, True, 'decreasing', 0) as loaders:
        for _ in range(12):
            images, _ = loaders.next_batches()
            windows = [[window(image) for image in images[d]] for d in 'xy']
            assert windows[0] == windows[1]
            seen.append(tuple(windows[0]))
    assert len(set(seen)) == len(seen)  # no two iterations alike
    assert {flipped for windows in seen for _, _, flipped in windows} == {False, True}


def test_flip_can_be_disabled(tmp_path):
    save_example(tmp_path, 'trainA', 'grid', coordinate_image(10, 8), [np.ones((10, 8), bool)])
    for seed in range(10):
        with iterator_a(tmp_path, load_size=(10, 8), fine_size=(10, 6), flip=False, seed=seed) as iterator:
            green = iterator.next()[0][0, 1, 0]
        assert (np.diff(green) > 0).all()


def test_instances_sorted_by_decreasing_area_and_padded(three_instances):
    areas = {}
    for ins_max in (2, 3, 5):
        with iterator_a(three_instances, load_size=(10, 10), fine_size=(10, 10), ins_max=ins_max) as iterator:
            _, masks = iterator.next()
        assert set(np.unique(masks)) <= {-1.0, 1.0}
        areas[ins_max] = (masks[0] == 1).sum(axis=(1, 2)).tolist()
    assert areas == {2: [60, 20], 3: [60, 20, 10], 5: [60, 20, 10, 0, 0]}


def test_random_set_order_shuffles_instances(three_instances):
    orders = set()
    for seed in range(20):
        with iterator_a(
            three_instances, load_size=(10, 10), fine_size=(10, 10), set_order='random', seed=seed
        ) as iterator:
            _, masks = iterator.next()
        orders.add(tuple((masks[0, :3] == 1).sum(axis=(1, 2))))
    assert len(orders) > 1 and all(sorted(order) == [10, 20, 60] for order in orders)


def test_area_is_measured_inside_the_crop(tmp_path):
    # Left instance: 4 columns, right instance: 3; a 6-wide crop of 10 may hide either one.
    masks = np.zeros((2, 4, 10), bool)
    masks[0, :, :4], masks[1, :, 7:] = True, True
    save_example(tmp_path, 'trainA', 'sides', coordinate_image(4, 10), masks)
    first_sides = set()
    for seed in range(30):
        with iterator_a(tmp_path, load_size=(4, 10), fine_size=(4, 6), seed=seed) as iterator:
            images, out = iterator.next()
        areas = (out[0] == 1).sum(axis=(1, 2))
        assert areas[0] >= areas[1]
        cols = to_uint8(images[0])[1] // 9
        first_sides.add('right' if cols[out[0, 0] == 1].min() >= 7 else 'left')
    assert first_sides == {'left', 'right'}


def test_each_pass_visits_every_image_once_in_a_new_order(tmp_path):
    for index in range(4):
        image = np.full((8, 8, 3), 10 * index, np.uint8)
        save_example(tmp_path, 'trainA', f'{index}', image, [np.ones((8, 8), bool)])
    with iterator_a(tmp_path, batch_size=4, load_size=(8, 8), fine_size=(8, 8)) as iterator:
        passes = [
            tuple(to_uint8(image)[0, 0, 0] // 10 for image in images) for images, _ in batches(iterator, 6)
        ]
    assert all(sorted(order) == [0, 1, 2, 3] for order in passes)
    assert len(set(passes)) > 1


def test_same_seed_same_batches(blobs):
    with blob_iterator(blobs, seed=3) as first, blob_iterator(blobs, seed=3) as second:
        assert_same_batches(batches(first, 4), batches(second, 4))
        with blob_iterator(blobs, seed=4) as other:
            assert not np.array_equal(first.next()[0], other.next()[0])


@pytest.mark.parametrize('set_order', ['decreasing', 'random'])
def test_set_state_resumes_exactly(blobs, set_order):
    with blob_iterator(blobs, seed=5, set_order=set_order) as original:
        batches(original, 3)  # 9 samples of 5: the saved position is mid-pass
        state = pickle.loads(pickle.dumps(original.get_state()))
        expected = batches(original, 4)
        original.set_state(state)  # rewinding the same iterator works too
        assert_same_batches(batches(original, 4), expected)
    with blob_iterator(blobs, seed=99, set_order=set_order) as resumed:
        resumed.set_state(state)
        assert_same_batches(batches(resumed, 4), expected)


def test_fresh_state_matches_first_batch(blobs):
    with blob_iterator(blobs) as original, blob_iterator(blobs, seed=1) as resumed:
        resumed.set_state(original.get_state())
        assert_same_batches(batches(resumed, 2), batches(original, 2))


@pytest.mark.parametrize('mode', ['RGB', 'L', 'RGBA', 'P'])
def test_image_modes_become_rgb(tmp_path, mode):
    rgb = np.random.RandomState(0).randint(0, 256, (6, 5, 3)).astype(np.uint8)
    Image.fromarray(rgb).convert(mode).save(tmp_path / 'image.png')
    image = load_image(tmp_path / 'image.png')
    assert image.shape == (3, 6, 5) and image.dtype == np.float32
    expected = np.asarray(Image.open(tmp_path / 'image.png').convert('RGB'), np.float32)
    np.testing.assert_allclose(image, expected.transpose(2, 0, 1) / 127.5 - 1)
    assert image.min() >= -1 and image.max() <= 1


def png16(path, values, colour_type):
    """A 16-bit PNG of uint16 values (H, W[, C]) written by hand, as Pillow writes none in
    colour: colour_type 0 grey, 2 RGB, 4 grey + alpha, 6 RGBA."""
    height, width = values.shape[:2]
    rows = b''.join(b'\0' + row.astype('>u2').tobytes() for row in values)

    def chunk(kind, data):
        crc = zlib.crc32(kind + data)
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', crc)

    header = struct.pack('>IIBBBBB', width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(
        b'\x89PNG\r\n\x1a\n'
        + chunk(b'IHDR', header)
        + chunk(b'IDAT', zlib.compress(rows))
        + chunk(b'IEND', b'')
    )


SIXTEEN_BIT = np.array([[0, 257, 32896, 65535, 1000]] * 2, np.uint16)


def rgb_of(path):
    return np.asarray(Image.open(path).convert('RGB'), np.float32).transpose(2, 0, 1) / 127.5 - 1


def test_photo_modes_read_as_their_rgb(tmp_path):
    """Every mode Pillow writes a photo in, as Pillow's own convert('RGB') shows it."""
    rgb = Image.fromarray(np.random.RandomState(0).randint(0, 256, (6, 5, 3)).astype(np.uint8))
    for mode in ['1', 'L', 'P', 'RGB', 'RGBA', 'LA']:
        rgb.convert(mode).save(tmp_path / f'{mode}.png')
    rgb.convert('RGB').save(tmp_path / 'bmp.bmp')
    rgb.convert('P').save(tmp_path / 'keyed.png', transparency=3)
    rgb.convert('L').save(tmp_path / 'keyed_grey.png', transparency=30)
    for path in sorted(tmp_path.iterdir()):
        image = load_image(path)
        assert image.shape == (3, 6, 5) and image.dtype == np.float32, path.name
        np.testing.assert_array_equal(image, rgb_of(path), err_msg=path.name)


def test_a_cmyk_jpeg_reads_as_its_colours_not_its_inks(tmp_path):
    rgb = np.full((16, 16, 3), 230, np.uint8)  # near white: 25 of ink
    rgb[:8] = [200, 40, 40]
    Image.fromarray(rgb).convert('CMYK').save(tmp_path / 'print.jpg', quality=100)
    image = load_image(tmp_path / 'print.jpg')
    np.testing.assert_array_equal(image, rgb_of(tmp_path / 'print.jpg'))
    assert np.abs(to_uint8(image).transpose(1, 2, 0) - rgb.astype(int)).max() <= 8


def test_16_bit_photos_are_scaled_not_clipped(tmp_path):
    png16(tmp_path / 'grey.png', SIXTEEN_BIT, 0)
    png16(
        tmp_path / 'rgb.png',
        np.stack([SIXTEEN_BIT, SIXTEEN_BIT[:, ::-1], np.full_like(SIXTEEN_BIT, 32896)], axis=-1),
        2,
    )
    grey = to_uint8(load_image(tmp_path / 'grey.png'))
    np.testing.assert_array_equal(grey[:, 0], [[0, 1, 128, 255, 4]] * 3)  # not white: scaled
    colour = to_uint8(load_image(tmp_path / 'rgb.png'))[:, 0]
    # Pillow keeps the high byte of 16-bit colour: 1000 is 3.9 in 8 bits, and becomes 3.
    np.testing.assert_array_equal(colour, [[0, 1, 128, 255, 3], [3, 255, 128, 1, 0], [128] * 5])


@pytest.mark.parametrize('mode', ['I', 'F', 'LAB'])
def test_modes_without_rgb_of_a_known_scale_are_refused(tmp_path, mode):
    """A TIFF named .png: files are recognised by their content."""
    grey = np.random.RandomState(0).randint(0, 256, (6, 5)).astype(np.uint8)
    image = (
        Image.fromarray(grey).convert('RGB').convert(mode)
        if mode == 'LAB'
        else Image.fromarray(grey).convert(mode)
    )
    path = tmp_path / 'image.png'
    image.save(path, format='TIFF')
    for read, kind in [(load_image, 'image'), (load_mask, 'mask')]:
        with pytest.raises(DataError) as error:
            read(path)
        assert str(error.value) == (
            f'{path}: the {kind} is in Pillow mode {mode}, which holds no RGB or grey values of '
            'a known scale; save it as an 8-bit or 16-bit grey, RGB or RGBA PNG'
        )


def save_oriented(image, path, orientation, **options):
    """Save a Pillow image with the EXIF Orientation tag (0x0112) set to `orientation`."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif, **options)
    with Image.open(path) as saved:
        assert saved.getexif()[0x0112] == orientation  # the format carries it


# A file of each of read_pixels' decode paths: imageio (PNG, JPEG) and Pillow's conversions.
ORIENTED_FILES = {
    'png': lambda rgb, path, orientation: save_oriented(rgb, path.with_suffix('.png'), orientation),
    'jpeg': lambda rgb, path, orientation: save_oriented(rgb, path.with_suffix('.jpg'), orientation),
    'cmyk jpeg': lambda rgb, path, orientation: save_oriented(
        rgb.convert('CMYK'), path.with_suffix('.jpg'), orientation
    ),
    'keyed png': lambda rgb, path, orientation: save_oriented(
        rgb.convert('P'), path.with_suffix('.png'), orientation, transparency=3
    ),
}
# 5x7 noise: none of its eight orientations looks like another, so a wrong one shows.
NOISE = Image.fromarray(np.random.RandomState(0).randint(0, 256, (5, 7, 3)).astype(np.uint8))


def test_the_orientations_of_the_test_photo_all_differ():
    methods = [None, *Image.Transpose]
    shown = {(NOISE if method is None else NOISE.transpose(method)).tobytes() for method in methods}
    assert len(methods) == 8 and len(shown) == 8


@pytest.mark.parametrize('orientation', [1, 2, 3, 4, 5, 6, 7, 8, 0, 9])  # 0, 9: no such value
@pytest.mark.parametrize('kind', ORIENTED_FILES)
def test_photos_are_read_upright_as_exif_transpose_shows_them(tmp_path, kind, orientation):
    ORIENTED_FILES[kind](NOISE, tmp_path / 'photo', orientation)
    (path,) = tmp_path.iterdir()
    with Image.open(path) as stored:
        expected = np.asarray(ImageOps.exif_transpose(stored).convert('RGB'))
    photo = read_photo(path)
    assert photo.shape == ((7, 5, 3) if orientation in (5, 6, 7, 8) else (5, 7, 3))
    np.testing.assert_array_equal(photo, expected)


def test_a_mask_is_read_upright_and_fits_its_upright_photo(tmp_path):
    """A phone photo stored sideways (orientation 6) and a mask drawn on it as it is shown."""
    stored = np.random.RandomState(1).randint(0, 256, (4, 6, 3)).astype(np.uint8)
    save_oriented(Image.fromarray(stored), tmp_path / 'photo.jpg', 6)
    drawn = np.zeros((6, 4), bool)
    drawn[:2, 1:] = True
    Image.fromarray(drawn).save(tmp_path / 'drawn.png')
    image, (mask,) = load_with_masks(tmp_path / 'photo.jpg', [tmp_path / 'drawn.png'])
    assert image.shape == (6, 4, 3)
    np.testing.assert_array_equal(mask, drawn)
    # The same mask stored sideways, 90 degrees counter-clockwise, and tagged 6 as the photo.
    save_oriented(Image.fromarray(np.rot90(drawn)), tmp_path / 'sideways.png', 6)
    np.testing.assert_array_equal(load_mask(tmp_path / 'sideways.png'), drawn)


def palette_mask(truth, white=False):
    mask = Image.frombytes('P', truth.shape[::-1], truth.astype(np.uint8).tobytes())
    mask.putpalette([255 * white] * 3 + [255] * 3)  # index 1 is white, as in VOC-style masks
    return mask


MASK_FORMATS = {
    '0/1 grey': lambda truth: Image.fromarray(truth.astype(np.uint8)),
    '0/255 grey': lambda truth: Image.fromarray(truth.astype(np.uint8) * 255),
    '1-bit': lambda truth: Image.fromarray(truth),
    'palette': palette_mask,
    'RGB': lambda truth: Image.fromarray(truth.astype(np.uint8) * 255).convert('RGB'),
    '16-bit': lambda truth: Image.fromarray(truth.astype(np.uint16) * 65535),
    '16-bit 0/1': lambda truth: Image.fromarray(truth.astype(np.uint16)),
    'RGBA opaque': lambda truth: Image.fromarray(truth.astype(np.uint8) * 255).convert('RGBA'),
    # in the alpha channel, under one colour
    'LA alpha': lambda truth: Image.fromarray(
        np.stack([np.full(truth.shape, 0, np.uint8), truth.astype(np.uint8) * 255], -1), 'LA'
    ),
    'RGBA white, alpha': lambda truth: Image.fromarray(
        np.dstack([np.full(truth.shape + (3,), 255, np.uint8), truth.astype(np.uint8) * 255])
    ),
    'RGBA black, alpha': lambda truth: Image.fromarray(
        np.dstack([np.zeros(truth.shape + (3,), np.uint8), truth.astype(np.uint8) * 255])
    ),
    # colour and alpha agree
    'LA both': lambda truth: Image.fromarray(np.stack([truth.astype(np.uint8) * 255] * 2, -1), 'LA'),
    'palette, transparent black': lambda truth: with_info(palette_mask(truth), transparency=0),
    # the mask only in the transparency: both palette entries are white
    'palette, white, transparent': lambda truth: with_info(palette_mask(truth, white=True), transparency=0),
    'grey, transparent black': lambda truth: with_info(
        Image.fromarray(truth.astype(np.uint8) * 255), transparency=0
    ),
}


def with_info(image, **info):
    image.info.update(info)
    return image


@pytest.mark.parametrize('kind', MASK_FORMATS)
def test_mask_formats(tmp_path, kind):
    truth = np.zeros((6, 5), bool)
    truth[1:4, 2:] = True
    MASK_FORMATS[kind](truth).save(tmp_path / 'mask.png')
    np.testing.assert_array_equal(load_mask(tmp_path / 'mask.png'), truth)


@pytest.mark.parametrize('kind', ['LA', 'RGBA'])
def test_a_mask_whose_colour_and_alpha_disagree_is_refused(tmp_path, kind):
    truth = np.zeros((6, 5), bool)
    truth[1:4, 2:] = True
    colour, alpha = truth.astype(np.uint8) * 255, truth[::-1].astype(np.uint8) * 255
    planes = [colour, alpha] if kind == 'LA' else [colour] * 3 + [alpha]
    Image.fromarray(np.stack(planes, -1), kind).save(tmp_path / 'mask.png')
    with pytest.raises(DataError) as error:
        load_mask(tmp_path / 'mask.png')
    assert str(error.value) == (
        f'{tmp_path / "mask.png"}: its colour and its transparency draw different masks; save '
        'the mask in one of them (white instance on black, opaque)'
    )


def test_empty_mask_stays_empty(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / 'mask.png')
    assert not load_mask(tmp_path / 'mask.png').any()


def test_mixed_formats_load_through_the_iterator(tmp_path):
    (tmp_path / 'trainA').mkdir()
    (tmp_path / 'trainA_seg').mkdir()
    for mode in ['RGB', 'L', 'RGBA', 'P']:
        image = Image.fromarray(np.full((20, 16, 3), 200, np.uint8)).convert(mode)
        image.save(tmp_path / 'trainA' / f'{mode}.png')
        Image.fromarray(np.ones((20, 16), np.uint8)).save(tmp_path / 'trainA_seg' / f'{mode}_0.png')
    with iterator_a(tmp_path, batch_size=4, load_size=(20, 16), fine_size=(18, 14)) as iterator:
        images, masks = iterator.next()
    assert images.shape == (4, 3, 18, 14)
    assert (masks[:, 0] == 1).all() and (masks[:, 1:] == -1).all()


def test_mask_paths_and_count_max_instances(tmp_path):
    empty = np.zeros((4, 4), bool)
    save_example(tmp_path, 'trainA', 'one', np.zeros((4, 4, 3), np.uint8), [empty])
    save_example(tmp_path, 'trainB', 'three', np.zeros((4, 4, 3), np.uint8), [empty] * 3)
    assert mask_paths(tmp_path / 'trainB' / 'three.png') == [
        tmp_path / 'trainB_seg' / f'three_{index}.png' for index in range(3)
    ]
    assert count_max_instances(tmp_path) == 3


def assert_data_error(path, action):
    """action() raises a one-line DataError that names path."""
    with pytest.raises(DataError) as error:
        action()
    message = str(error.value)
    assert str(path) in message and '\n' not in message


def test_missing_folders_are_named(tmp_path):
    assert_data_error(tmp_path / 'nowhere', lambda: iterator_a(tmp_path / 'nowhere'))
    assert_data_error(tmp_path / 'trainA', lambda: iterator_a(tmp_path))
    (tmp_path / 'trainA').mkdir()
    (tmp_path / 'trainA' / 'notes.txt').write_text('not an image')
    assert_data_error(tmp_path / 'trainA', lambda: iterator_a(tmp_path))


def test_image_without_mask_is_named(tmp_path):
    save_example(tmp_path, 'trainA', 'lonely', np.zeros((4, 4, 3), np.uint8), [])
    assert_data_error(tmp_path / 'trainA' / 'lonely.png', lambda: iterator_a(tmp_path))


@pytest.mark.parametrize('orphan', ['ghost_0.png', 'paired_2.png'])  # no image; gap after paired_0
def test_mask_without_image_is_named(tmp_path, orphan):
    empty = np.zeros((4, 4), bool)
    save_example(tmp_path, 'trainA', 'paired', np.zeros((4, 4, 3), np.uint8), [empty])
    Image.fromarray(empty).save(tmp_path / 'trainA_seg' / orphan)
    assert_data_error(tmp_path / 'trainA_seg' / orphan, lambda: iterator_a(tmp_path))


@pytest.mark.parametrize('other', ['a.jpg', 'a.PNG'])
def test_two_images_of_one_name_are_refused_naming_both(tmp_path, other):
    """a.png and a.jpg would both take the masks a_0.png, ... of trainA_seg."""
    image = np.zeros((4, 4, 3), np.uint8)
    save_example(tmp_path, 'trainA', 'a', image, [np.ones((4, 4), bool)])
    save_example(tmp_path, 'trainB', 'b', image, [np.ones((4, 4), bool)])
    Image.fromarray(image).save(tmp_path / 'trainA' / other, format='PNG')
    message = (
        f'{tmp_path / "trainA" / other} and {tmp_path / "trainA" / "a.png"}: two '
        'images named a, which would share the masks a_0.png, ...; rename one'
    )
    for action in [lambda: iterator_a(tmp_path), lambda: count_max_instances(tmp_path)]:
        with pytest.raises(DataError) as error:
            action()
        assert str(error.value) == message


def test_mask_size_mismatch_is_named_when_loaded(tmp_path):
    save_example(tmp_path, 'trainA', 'odd', np.zeros((8, 6, 3), np.uint8), [np.ones((8, 5), bool)])
    with iterator_a(tmp_path, load_size=(8, 6), fine_size=(8, 6)) as iterator:
        assert_data_error(tmp_path / 'trainA_seg' / 'odd_0.png', iterator.next)


def test_corrupt_files_are_named(tmp_path):
    noise = np.random.RandomState(0).randint(0, 256, (30, 20, 3)).astype(np.uint8)
    save_example(tmp_path, 'trainA', 'cut', noise, [np.ones((30, 20), bool)])
    image_path = tmp_path / 'trainA' / 'cut.png'
    image_path.write_bytes(image_path.read_bytes()[:1000])  # cut inside the pixel data
    garbage = tmp_path / 'garbage.png'
    garbage.write_bytes(b'not a png at all')
    assert_data_error(image_path, lambda: load_image(image_path))
    assert_data_error(garbage, lambda: load_mask(garbage))
    with iterator_a(tmp_path, load_size=(30, 20), fine_size=(30, 20)) as iterator:
        assert_data_error(image_path, iterator.next)


def test_crop_larger_than_load_size_is_rejected(blobs):
    with pytest.raises(ValueError, match='fine_size'):
        iterator_a(blobs, load_size=(32, 24), fine_size=(33, 20))


def test_bundled_sample_loads():
    assert count_max_instances(SAMPLE) == 1
    for domain in 'AB':
        with MaskedImageIterator(SAMPLE, 'train', domain, 2, seed=1) as iterator:
            assert iterator.size == 8
            images, masks = iterator.next()
        assert images.shape == (2, 3, 300, 200) and masks.shape == (2, 4, 300, 200)
        assert ((masks[:, 0] == 1).mean(axis=(1, 2)) > 0.02).all()  # garments are clearly visible
        val_images = sorted((SAMPLE / f'val{domain}').glob('*.png'))
        assert len(val_images) == 4
        assert all(load_image(path).shape == (3, 330, 220) for path in val_images)


def test_bundled_multi_sample_has_several_instances_per_image():
    assert count_max_instances(MULTI_SAMPLE) == 3
    for domain in 'AB':
        mask_counts = [
            len(mask_paths(path)) for path in sorted((MULTI_SAMPLE / f'train{domain}').glob('*.png'))
        ]
        # One batch of the whole folder, uncropped, so every instance slot is seen at load size.
        with MaskedImageIterator(
            MULTI_SAMPLE, 'train', domain, len(mask_counts), fine_size=(330, 220), ins_max=4
        ) as iterator:
            images, masks = iterator.next()
        assert images.shape == (6, 3, 330, 220) and masks.shape == (6, 4, 330, 220)
        filled_slots = (masks == 1).any(axis=(2, 3)).sum(axis=1)
        assert sorted(filled_slots) == sorted(mask_counts)  # no instance vanished
        assert (filled_slots >= 2).all()
        val_images = sorted((MULTI_SAMPLE / f'val{domain}').glob('*.png'))
        assert len(val_images) == 2
        assert all(load_image(path).shape == (3, 330, 220) for path in val_images)
    assert (MULTI_SAMPLE / 'LICENSE').read_bytes() == (SAMPLE / 'LICENSE').read_bytes()
