"""Translate a photo and its instance masks with an exported InstaGAN generator, using
onnxruntime alone: numpy and Pillow, no NNabla and nothing else of this project.

    python examples/onnx_translate.py results/export/generator_AtoB_64x44_k1.onnx \\
        --image photo.png --masks photo_0.png photo_1.png --out translated.png

The model (export.py, docs/deploy.md) is ONE pass over K instance slots. More instances are
translated as InstaGAN does at test time: largest first, K at a time, each pass on the
previous pass's translated image, the last pass's spare slots padded with empty (all -1) masks.
Writes the translated image at the photo's size, OUT_0.png, ... the translated masks (in the
order of --masks), and with --npz the network-size float outputs.
"""

import argparse
import math
import os

import numpy as np
import onnxruntime
from PIL import Image


def to_network(values, size):
    """uint8 (H, W[, 3]) -> float32 in [-1, 1] at size (H, W), bicubic as in training."""
    resized = Image.fromarray(values).resize((size[1], size[0]), Image.BICUBIC)
    return np.asarray(resized).astype(np.float32) / 127.5 - 1


def read_image(path, size):
    """(3, H, W) in [-1, 1], and the photo's own (height, width)."""
    photo = np.asarray(Image.open(path).convert('RGB'))
    return to_network(photo, size).transpose(2, 0, 1), photo.shape[:2]


def read_mask(path, size):
    """(H, W) in [-1, 1]: on where the file is brighter than half its brightest pixel."""
    grey = np.asarray(Image.open(path).convert('L'))
    if grey.max() > grey.min():
        on = grey > grey.max() / 2
    else:  # one value everywhere: all on unless black
        on = np.full(grey.shape, grey.max() > 0)
    return to_network(on.astype(np.uint8) * 255, size)


def to_photo(values, size):
    """(C, h, w) in [-1, 1] -> uint8 (H, W, C) at the photo's size."""
    pixels = ((np.clip(values, -1, 1) + 1) * 127.5).round().astype(np.uint8)
    return np.stack(
        [np.asarray(Image.fromarray(c).resize((size[1], size[0]), Image.BILINEAR)) for c in pixels], axis=-1
    )


def translate(session, image, masks):
    """Chain the passes: (3, H, W) image and (N, H, W) masks -> translated image and masks."""
    slots = session.get_inputs()[1].shape[1]  # K
    order = np.argsort(-(masks + 1).sum(axis=(1, 2)), kind='stable')  # largest first
    passes = max(1, math.ceil(len(masks) / slots))
    padded = np.full((passes * slots,) + image.shape[1:], -1, np.float32)
    padded[: len(masks)] = masks[order]
    translated = np.empty_like(padded)
    for start in range(0, len(padded), slots):
        feed = {'image': image[None], 'masks': padded[None, start : start + slots]}
        image_out, masks_out = session.run(['translated_image', 'translated_masks'], feed)
        image, translated[start : start + slots] = image_out[0], masks_out[0]
    in_file_order = np.empty_like(translated[: len(masks)])
    in_file_order[order] = translated[: len(masks)]
    return image, in_file_order


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('model', help='an .onnx file written by export.py')
    parser.add_argument('--image', required=True, help='the photo')
    parser.add_argument('--masks', nargs='+', required=True, help='its instance masks')
    parser.add_argument('--out', required=True, help='the translated image (.png)')
    parser.add_argument('--npz', help='also save the network-size outputs (image, masks)')
    args = parser.parse_args()

    session = onnxruntime.InferenceSession(args.model, providers=['CPUExecutionProvider'])
    size = tuple(session.get_inputs()[0].shape[2:])  # (H, W)
    about = session.get_modelmeta().custom_metadata_map
    print(
        f'{args.model}: {about.get("direction", "?")}, network size {size[0]}x{size[1]}, '
        f'{session.get_inputs()[1].shape[1]} slots per pass'
    )
    image, photo_size = read_image(args.image, size)
    masks = np.stack([read_mask(path, size) for path in args.masks])
    image_out, masks_out = translate(session, image, masks)

    Image.fromarray(to_photo(image_out, photo_size)).save(args.out)
    stem, extension = os.path.splitext(args.out)
    for index, mask in enumerate(masks_out):
        Image.fromarray(to_photo(mask[None], photo_size)[:, :, 0]).save(f'{stem}_{index}{extension}')
    if args.npz:
        np.savez(args.npz, image=image_out, masks=masks_out)
    print(f'wrote {args.out} and {len(masks_out)} translated masks')


if __name__ == '__main__':
    main()
