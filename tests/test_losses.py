"""Each loss against a value worked out by hand on a tiny tensor."""

import nnabla as nn
import numpy as np
import pytest

from losses import context_preserving_loss, discriminator_loss, image_and_masks_l1, lsgan_loss, mask_union


def evaluate(loss):
    loss.forward()
    return float(loss.d)


def evaluate_array(variable):
    variable.forward()
    return variable.d


def constant(values):
    values = np.asarray(values, dtype=np.float32)
    variable = nn.Variable(values.shape)
    variable.d = values
    return variable


def test_lsgan_loss():
    scores = constant([[[[0.5, -1.0]]]])
    assert evaluate(lsgan_loss(scores, 1.0)) == pytest.approx((0.25 + 4.0) / 2)
    assert evaluate(lsgan_loss(scores, 0.0)) == pytest.approx((0.25 + 1.0) / 2)


def test_discriminator_loss():
    real, fake = constant([[[[1.0, 0.0]]]]), constant([[[[0.0, 2.0]]]])
    # 0.5 * (mean((0, -1)^2) + mean((0, 2)^2)) = 0.5 * (0.5 + 2)
    assert evaluate(discriminator_loss(real, fake)) == pytest.approx(1.25)


def test_image_and_masks_l1_averages_over_all_channels():
    image, other_image = np.zeros((1, 3, 1, 2)), np.zeros((1, 3, 1, 2))
    other_image[0, 0, 0, 0] = 0.6
    masks, other_masks = -np.ones((1, 1, 1, 2)), -np.ones((1, 1, 1, 2))
    other_masks[0, 0, 0, 1] = 1.0
    # 8 elements, absolute differences 0.6 and 2.0
    loss = image_and_masks_l1(constant(image), constant(masks), constant(other_image), constant(other_masks))
    assert evaluate(loss) == pytest.approx(2.6 / 8)


def test_mask_union_is_clipped_sum():
    masks = constant([[[[1.0, -1.0, 0.0]], [[1.0, -1.0, -1.0]]]])
    np.testing.assert_allclose(evaluate_array(mask_union(masks)), [[[[1.0, 0.0, 0.5]]]])


def test_context_preserving_loss_weights_background_only():
    # 1 x 4 pixels; instance 0 covers pixel 0 in the source, the translation covers pixel 1.
    image = np.zeros((1, 3, 1, 4))
    translated = np.zeros((1, 3, 1, 4))
    translated[:, :, 0, :] = [0.5, 0.7, 0.2, 0.1]  # every pixel changed
    masks = np.array([[[[1.0, -1.0, -1.0, -1.0]]]])
    translated_masks = np.array([[[[-1.0, 1.0, 0.0, -1.0]]]])
    # weights: 0 (source), 0 (translated), 0.5 (half in translated), 1 (background)
    expected = 3 * (0.5 * 0.2 + 1.0 * 0.1) / 12
    loss = context_preserving_loss(
        constant(image), constant(masks), constant(translated), constant(translated_masks)
    )
    assert evaluate(loss) == pytest.approx(expected)


def test_context_preserving_loss_is_zero_when_only_instances_change():
    image = np.random.RandomState(0).uniform(-1, 1, (2, 3, 4, 4))
    masks = -np.ones((2, 2, 4, 4))
    masks[:, 1, :2] = 1
    translated = image.copy()
    translated[:, :, :2] += 0.5
    loss = context_preserving_loss(constant(image), constant(masks), constant(translated), constant(masks))
    assert evaluate(loss) == pytest.approx(0.0, abs=1e-7)


def test_weights_average_over_the_chosen_samples_only():
    image = constant(np.zeros((3, 3, 2, 2)))
    other = np.zeros((3, 3, 2, 2))
    other[0], other[1], other[2] = 0.3, 0.5, 100.0
    masks = constant(-np.ones((3, 1, 2, 2)))
    weights = constant([1.0, 1.0, 0.0])
    loss = image_and_masks_l1(image, masks, constant(other), masks, weights)
    # per sample: 12 of 16 elements differ by 0.3 and 0.5; sample 2 is left out
    assert evaluate(loss) == pytest.approx((0.3 + 0.5) * 12 / 16 / 2)
    assert evaluate(lsgan_loss(constant(np.zeros((3, 1, 1, 1))), 1.0, constant([0.0, 0.0, 0.0]))) == 0.0
