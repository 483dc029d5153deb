"""InstaGAN losses (paper section 2.2): LSGAN, cycle, identity and context-preserving.

Images are (B, 3, H, W) and instance masks (B, N, H, W), both in [-1, 1]. Every loss is a mean
over the batch; with `weights` (B,) of 0/1 it is the mean over the samples weighted 1 (in
sequential training, the samples that have instances in the current pass).
"""

import nnabla.functions as F

# The terms a run monitors, each for both directions (NAME_x, NAME_y).
LOSS_NAMES = [
    'discriminator_loss',
    'generator_loss',
    'reconstruction_loss',
    'identity_mapping_loss',
    'context_preserving_loss',
]


def batch_mean(values, weights=None):
    if weights is None:
        return F.mean(values)
    per_sample = F.mean(values, axis=tuple(range(1, values.ndim)))
    return F.sum(per_sample * weights) / F.maximum_scalar(F.sum(weights), 1.0)


def lsgan_loss(scores, target, weights=None):
    """Least-squares GAN loss: mean squared distance of the patch scores to 1 (real) or 0 (fake)."""
    return batch_mean(F.squared_error(scores, F.constant(target, scores.shape)), weights)


def discriminator_loss(real_scores, fake_scores, fake_weights=None):
    return 0.5 * (lsgan_loss(real_scores, 1.0) + lsgan_loss(fake_scores, 0.0, fake_weights))


def image_and_masks_l1(image, masks, other_image, other_masks, weights=None, mask_channels=None):
    """Mean absolute difference over the image channels and the mask channels together.

    Used for the cycle loss (reconstruction vs. input) and the identity loss (a generator fed
    an image of its own output domain should leave image and masks unchanged).

    mask_channels: the mean is over 3 + mask_channels channels, of which the slots beyond
    masks.shape[1] are taken to be empty in both, adding no error. The official code always
    carries --ins-per slots per pass, empty ones included, so on one-instance data (CCP) its
    L1 averages over 3 + 2 channels; passing mask_channels=--ins-per keeps that weight when
    fewer slots are built.
    """
    channels = image.shape[1] + masks.shape[1]
    loss = batch_mean(
        F.absolute_error(
            F.concatenate(image, masks, axis=1), F.concatenate(other_image, other_masks, axis=1)
        ),
        weights,
    )
    if mask_channels is None or mask_channels == masks.shape[1]:
        return loss
    if mask_channels < masks.shape[1]:
        raise ValueError(f'mask_channels {mask_channels} < the {masks.shape[1]} slots given')
    return loss * (channels / (image.shape[1] + mask_channels))


def mask_union(masks):
    """(B, N, H, W) masks in [-1, 1] -> (B, 1, H, W) soft union in [0, 1]."""
    return F.clip_by_value(F.sum((masks + 1) * 0.5, axis=1, keepdims=True), 0.0, 1.0)


def context_preserving_loss(image, masks, translated_image, translated_masks, weights=None):
    """L1 between an image and its translation, weighted 1 on the background and 0 inside the
    union of the source instances and the translated instances: the translation may only change
    the instances, never their surroundings."""
    background = 1 - mask_union(F.concatenate(masks, translated_masks, axis=1))
    return batch_mean(background * F.absolute_error(image, translated_image), weights)
