"""evaluate.py: its classifiers and metrics on hand-made inputs, and end to end on a tiny model."""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import nnabla as nn
import numpy as np
import pytest
from PIL import Image
from test_train import SAMPLE, TINY

import evaluate
import train
from conftest import ROOT
from runtime.checkpoints import checkpoint_paths
from translator import load_translators

SIZE = (32, 24)  # network size (H, W) of the hand-made datasets and of TINY


def strip(top, left, height=20, width=6, size=SIZE):
    """One instance mask in [-1, 1]: a height x width rectangle at (top, left)."""
    mask = np.full(size, -1, np.float32)
    mask[top : top + height, left : left + width] = 1
    return mask


def write_dataset(root, phase, domain, images, mask_sets):
    """Write (3, H, W) images in [-1, 1] and their (N, H, W) masks as {phase}{domain} PNGs."""
    for folder in [phase + domain, phase + domain + '_seg']:
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i, (image, masks) in enumerate(zip(images, mask_sets)):
        pixels = ((image.transpose(1, 2, 0) + 1) * 127.5).round().astype(np.uint8)
        Image.fromarray(pixels).save(root / (phase + domain) / f'{i:03d}.png')
        for n, mask in enumerate(masks):
            Image.fromarray(((mask > 0) * 255).astype(np.uint8)).save(
                root / (phase + domain + '_seg') / f'{i:03d}_{n}.png'
            )


def grey(size=SIZE):
    return np.full((3,) + size, 0.2, np.float32)  # 0.2 is 153/127.5 - 1: exact in 8 bits


def left_and_right(root, phase, count, image=grey):
    """Domain A: a strip on the left half; domain B: on the right half, the mirror image."""
    for domain, left in [('A', 3), ('B', 15)]:
        masks = [strip(2 + i % 4, left + i % 3)[None] for i in range(count)]
        write_dataset(root, phase, domain, [image() for _ in range(count)], masks)


def mirror(image, masks):
    return image[:, :, ::-1].copy(), masks[:, :, ::-1].copy()


def identity(image, masks):
    return image, masks


def fitted_classifier(root):
    features = {
        d: evaluate.mask_features(s.masks for s in evaluate.load_phase(root, 'train', d, SIZE)) for d in 'AB'
    }
    classifier = evaluate.LogisticRegression().fit(
        np.concatenate([features['A'], features['B']]),
        np.r_[np.zeros(len(features['A'])), np.ones(len(features['B']))],
    )
    return classifier, features


def score(root, forward, backward, phase='test'):
    classifier, features = fitted_classifier(root)
    summary, results = evaluate.evaluate_direction(
        evaluate.load_phase(root, phase, 'A', SIZE), forward, backward, classifier, 'B', features['B']
    )
    return summary, results


def test_logistic_regression_reaches_its_optimum_and_separates():
    rng = np.random.RandomState(0)
    features = rng.rand(40, 5)
    labels = (features[:, 0] > 0.5).astype(float)
    model = evaluate.LogisticRegression(l2=1e-2).fit(features, labels)
    # gradient of the weighted log-loss plus the penalty vanishes at the fitted weights
    weight = np.where(labels == 1, 0.5 / labels.sum(), 0.5 / (1 - labels).sum())
    x = np.hstack([features, np.ones((40, 1))])
    gradient = x.T @ (weight * (model.probability(features) - labels))
    gradient[:-1] += 1e-2 * model.weights[:-1]
    assert np.abs(gradient).max() < 1e-7
    assert np.all((model.probability(features) >= 0.5) == (labels == 1))
    with pytest.raises(ValueError):
        evaluate.LogisticRegression().fit(features, np.ones(40))


def test_two_sample_accuracy_is_one_when_separable_and_near_half_when_alike():
    rng = np.random.RandomState(1)
    left, right = np.zeros((30, 8)), np.zeros((30, 8))
    left[:, 0], right[:, 1] = 1, 1
    assert evaluate.cross_validated_accuracy(left, right) == 1.0
    first, second = rng.rand(60, 8), rng.rand(60, 8)
    assert abs(evaluate.cross_validated_accuracy(first, second) - 0.5) < 0.15
    # balanced: a few samples against many still give about one half, not the majority's share
    assert abs(evaluate.cross_validated_accuracy(first[:10], second) - 0.5) < 0.2
    assert evaluate.cross_validated_accuracy(first, second, seed=3) == evaluate.cross_validated_accuracy(
        first, second, seed=3
    )


def test_classes_weigh_equally_and_accuracy_is_balanced():
    # one feature vector for all: the fit can only learn the class shares, which are equalised
    model = evaluate.LogisticRegression().fit(np.zeros((4, 2)), [0, 1, 1, 1])
    assert model.probability(np.zeros((1, 2))) == pytest.approx([0.5])
    # every sample then lands in class 1 (p >= 0.5): plain accuracy would be 0.8, balanced 0.5
    assert evaluate.cross_validated_accuracy(np.zeros((2, 3)), np.zeros((8, 3))) == 0.5


def test_mask_iou_by_hand():
    top, lower = strip(0, 0, height=16), strip(8, 0, height=16)
    empty = np.full(SIZE, -1, np.float32)
    np.testing.assert_allclose(
        evaluate.mask_iou(np.stack([top, top, empty]), np.stack([top, lower, empty])), [1, 1 / 3, 1]
    )


def test_perfectly_separable_masks_give_domain_score_one(tmp_path):
    left_and_right(tmp_path, 'train', 8)
    left_and_right(tmp_path, 'test', 5)
    summary, results = score(tmp_path, mirror, mirror)
    assert summary['images'] == summary['instances'] == 5
    assert summary['domain_score'] == 1 and summary['domain_score_source'] == 0
    assert summary['realism_accuracy_source'] == 1
    assert summary['realism_accuracy'] < 0.75  # the mirrored masks are copies of real B ones
    assert summary['mask_iou'] == 0  # left strip against right strip
    # mirroring a uniform image changes nothing; mirroring twice is the identity
    for key in [
        'background_error',
        'inside_error',
        'background_error_full',
        'resampling_floor_full',
        'cycle_error_image',
        'cycle_error_masks',
    ]:
        assert summary[key] == pytest.approx(0, abs=1e-6), key
    probabilities = [r.target_probability for r in results]
    assert probabilities == sorted(probabilities, reverse=True) and min(probabilities) > 0.5


def test_identity_translation_costs_only_resampling(tmp_path):
    left_and_right(tmp_path, 'train', 6)
    # photos twice the network size, of noise, so that resampling alone costs something
    rng = np.random.RandomState(0)
    photos = [rng.uniform(-1, 1, (3, 64, 48)).astype(np.float32) for _ in range(3)]
    masks = [strip(4, 6, 40, 12, size=(64, 48))[None] for _ in range(3)]
    write_dataset(tmp_path, 'test', 'A', photos, masks)
    summary, results = score(tmp_path, identity, identity)
    assert summary['domain_score'] == 0 and summary['mask_iou'] == 1
    assert summary['realism_accuracy'] == summary['realism_accuracy_source']
    for key in [
        'background_error',
        'inside_error',
        'cycle_error_image',
        'cycle_error_masks',
        'background_excess_full',
    ]:
        assert summary[key] == 0, key
    assert summary['resampling_floor_full'] > 0.1
    assert summary['background_error_full'] == summary['resampling_floor_full']
    assert all(r.background == 0 and r.iou == 1 for r in results)


def test_context_and_cycle_errors_by_hand(tmp_path):
    left_and_right(tmp_path, 'train', 6)
    left_and_right(tmp_path, 'test', 4)  # photos at network size: resampling costs nothing

    def move_and_paint(image, masks):  # mirrored masks, +0.25 inside them only
        image, masks = image.copy(), masks[:, :, ::-1]
        return image + 0.25 * evaluate.union(masks), masks

    def halve_masks(image, masks):  # leaves the image, halves the masks
        return image, masks / 2

    summary, _ = score(tmp_path, move_and_paint, halve_masks)
    assert summary['background_error'] == summary['background_error_full'] == 0
    assert summary['resampling_floor_full'] == 0
    # the painted translated strip is half the union of source and translated strips
    assert summary['inside_error'] == pytest.approx(0.25 / 2)
    area = np.mean([(s.masks > 0).mean() for s in evaluate.load_phase(tmp_path, 'test', 'A', SIZE)])
    assert summary['cycle_error_image'] == pytest.approx(0.25 * area)
    # |m - mirror(m) / 2| with m = +-1: 1.5 on either strip, 0.5 elsewhere
    assert summary['cycle_error_masks'] == pytest.approx(1.5 * 2 * area + 0.5 * (1 - 2 * area))

    summary, _ = score(
        tmp_path, lambda image, masks: (image + 0.1, masks), lambda image, masks: (image - 0.05, masks)
    )
    assert summary['background_error_full'] == summary['background_excess_full'] == pytest.approx(0.1)
    assert summary['resampling_floor_full'] == 0
    assert summary['inside_error'] == pytest.approx(0.1)
    assert summary['cycle_error_image'] == pytest.approx(0.05)


def test_phase_checks(tmp_path):
    small, large = strip(0, 0, 4, 4), strip(10, 10, 12, 8)
    write_dataset(tmp_path, 'order', 'A', [grey(), grey()], [[small, large], [large, small]])
    for sample in evaluate.load_phase(tmp_path, 'order', 'A', SIZE):
        np.testing.assert_array_equal(sample.masks, [large, small])  # largest first
    left_and_right(tmp_path, 'test', 1)
    with pytest.raises(evaluate.DataError, match='one image; cross-validation needs'):
        evaluate.load_phase(tmp_path, 'test', 'A', SIZE)
    left_and_right(tmp_path, 'val', 2)
    for mask in (tmp_path / 'valB_seg').iterdir():
        mask.unlink()
    with pytest.raises(evaluate.DataError, match='no instance mask in .*valB_seg'):
        evaluate.load_phase(tmp_path, 'val', 'B', SIZE)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A checkpoint of one tiny epoch on the bundled sample."""
    path = tmp_path_factory.mktemp('run')
    nn.clear_parameters()
    train.main(
        TINY
        + [
            '--max-epoch',
            '1',
            '--monitor-path',
            str(path / 'monitor'),
            '--model-save-path',
            str(path / 'models'),
        ]
    )
    return path / 'models'


def run_evaluate(*flags):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'evaluate.py')] + list(flags),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    return result.returncode, result.stdout, result.stderr


def run_evaluate_patched(patch, *flags):
    """run_evaluate, with the Python code `patch` run first in the same process."""
    script = (
        patch + 'import runpy, sys\n'
        f'sys.argv = ["evaluate.py"] + {list(flags)!r}\n'
        'runpy.run_path("evaluate.py", run_name="__main__")\n'
    )
    result = subprocess.run(
        [sys.executable, '-c', script], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    return result.returncode, result.stdout, result.stderr


def test_both_generators_stay_usable_side_by_side(trained):
    _, _, generators = load_translators(str(trained), ['AtoB', 'BtoA'])
    sample = evaluate.load_phase(SAMPLE, 'train', 'A', SIZE)[0]
    together = generators['AtoB'](sample.image, sample.masks)
    _, _, alone = load_translators(str(trained), ['AtoB'])
    alone = alone['AtoB'](sample.image, sample.masks)
    for a, b in zip(together, alone):
        np.testing.assert_array_equal(a, b)


def test_evaluate_a_tiny_model_end_to_end(trained, tmp_path):
    code, stdout, stderr = run_evaluate(
        '--model-save-path',
        str(trained),
        '--dataroot',
        SAMPLE,
        '--phase',
        'train',
        '--json',
        '--out',
        str(tmp_path),
    )
    assert code == 0, stderr
    assert len(stdout.splitlines()) == 1
    report = json.loads(stdout)
    assert report['phase'] == 'train' and report['size'] == list(SIZE)
    assert report['checkpoint'] == checkpoint_paths(str(trained))[-1]
    classifier = report['classifier']
    assert classifier['train_images'] == classifier['phase_images'] == {'A': 8, 'B': 8}
    assert 0 <= classifier['accuracy'] <= 1
    for direction, (source, _) in evaluate.DIRECTIONS.items():
        figures = report[direction]
        assert set(figures) == {'images', 'instances'} | {key for key, _ in evaluate.METRICS}
        assert figures['images'] == 8
        assert figures['instances'] == len(os.listdir(os.path.join(SAMPLE, 'train' + source + '_seg')))
        assert all(math.isfinite(value) for value in figures.values())
        for key in [
            'domain_score',
            'domain_score_source',
            'realism_accuracy',
            'realism_accuracy_source',
            'mask_iou',
        ]:
            assert 0 <= figures[key] <= 1, key
        for key in [
            'background_error',
            'inside_error',
            'background_error_full',
            'resampling_floor_full',
            'cycle_error_image',
            'cycle_error_masks',
        ]:
            assert 0 <= figures[key] <= 2, key
        assert figures['background_excess_full'] == pytest.approx(
            figures['background_error_full'] - figures['resampling_floor_full']
        )

    page = (tmp_path / 'index.html').read_text()
    assert not list(tmp_path.glob('*.partial*'))
    for direction, (source, _) in evaluate.DIRECTIONS.items():
        section = page.split(f'<h2>{direction}</h2>')[1].split('<h2>')[0]
        tiles = re.findall(r'<img src="([^"]+)"', section)
        stems = sorted(os.path.splitext(n)[0] for n in os.listdir(os.path.join(SAMPLE, 'train' + source)))
        assert sorted(tiles) == [f'{direction}_{s}.png' for s in stems]
        assert all(Image.open(tmp_path / tile).size == (4 * SIZE[1], SIZE[0]) for tile in tiles)
        probabilities = [float(p) for p in re.findall(r'p\(target\) ([0-9.]+)', section)]
        assert probabilities == sorted(probabilities, reverse=True)

    code, table, stderr = run_evaluate(
        '--model-save-path',
        str(trained),
        '--dataroot',
        SAMPLE,
        '--phase',
        'train',
        '--out',
        str(tmp_path / 'table'),
    )
    assert code == 0, stderr
    assert table.strip() == evaluate.format_table(report)


def test_classifier_figures_on_separable_data(trained, tmp_path, capsys):
    left_and_right(tmp_path, 'train', 6)
    left_and_right(tmp_path, 'test', 3)
    evaluate.main(
        [
            '--model-save-path',
            str(trained),
            '--dataroot',
            str(tmp_path),
            '--json',
            '--out',
            str(tmp_path / 'out'),
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert report['classifier']['accuracy'] == 1
    assert report['classifier']['phase_images'] == {'A': 3, 'B': 3}
    for direction in evaluate.DIRECTIONS:
        assert report[direction]['domain_score_source'] == 0
        assert report[direction]['realism_accuracy_source'] == 1


def refusal(*flags):
    """The one line a refused run prints, after nnabla's log lines."""
    code, _, stderr = run_evaluate(*flags)
    assert code == 1
    lines = [line for line in stderr.splitlines() if '[nnabla][INFO]' not in line]
    assert len(lines) == 1 and 'Traceback' not in stderr, stderr
    return lines[0]


def test_bad_inputs_get_one_line(trained, tmp_path):
    base = ['--model-save-path', str(trained), '--dataroot', SAMPLE, '--out', str(tmp_path / 'o')]
    assert refusal(*base, '--phase', 'test') == 'evaluate.py: {}: folder not found'.format(
        os.path.join(SAMPLE, 'testA')
    )
    line = refusal(*base, '--phase', 'val')
    assert re.fullmatch(
        r'evaluate\.py: \S+valA/\S+\.png: no instance mask in \S+valA_seg; '
        r'evaluate\.py needs a phase with masks \(val has none\)',
        line,
    ), line

    damaged = tmp_path / 'damaged'
    shutil.copytree(trained, damaged)
    checkpoint = checkpoint_paths(str(damaged))[-1]
    flags = [
        '--model-save-path',
        str(damaged),
        '--dataroot',
        SAMPLE,
        '--phase',
        'train',
        '--out',
        str(tmp_path / 'o'),
    ]
    parameters = os.path.join(checkpoint, 'parameters.h5')
    with open(parameters, 'r+b') as f:
        f.truncate(1000)
    assert refusal(*flags).startswith(
        f'evaluate.py: {parameters}: damaged or not a parameter file (OSError: '
    )
    shutil.copy(os.path.join(checkpoint_paths(str(trained))[-1], 'parameters.h5'), parameters)
    with open(os.path.join(checkpoint, 'state.json'), 'w') as f:
        f.write('{"args": ')
    assert refusal(*flags).startswith(
        'evaluate.py: {}: unreadable or damaged (JSONDecodeError: '.format(
            os.path.join(checkpoint, 'state.json')
        )
    )
    assert not (tmp_path / 'o').exists()

    code, _, stderr = run_evaluate(*base[:2], '--dataroot', str(tmp_path / 'nowhere'))
    assert code == 2 and stderr.strip().splitlines()[-1].endswith(
        'argument --dataroot: {}: folder not found'.format(tmp_path / 'nowhere')
    )
    code, _, stderr = run_evaluate(*base, '--phase', '../train')
    assert code == 2 and "'../train' is not a phase name" in stderr


def test_ctrl_c_while_writing_leaves_no_partial_file(trained, tmp_path):
    """A stop while the results are written (here a SIGINT once the first tile's bytes are
    encoded) lets that file be written whole, then ends with one line and the shell's code for
    SIGINT."""
    code, _, stderr = run_evaluate_patched(
        'import os, signal\n'
        'from PIL import Image\n'
        'save = Image.Image.save\n'
        'def save_then_stop(*args, **kwargs):\n'
        '    save(*args, **kwargs)\n'
        '    os.kill(os.getpid(), signal.SIGINT)\n'
        'Image.Image.save = save_then_stop\n',
        '--model-save-path',
        str(trained),
        '--dataroot',
        SAMPLE,
        '--phase',
        'train',
        '--out',
        str(tmp_path),
    )
    assert code == 130
    assert 'Traceback' not in stderr
    assert stderr.strip().splitlines()[-1] == (
        'evaluate.py: stopped by SIGINT after 1 tile; index.html is not written'
    )
    written = os.listdir(tmp_path)
    assert len(written) == 1 and written[0].endswith('.png') and '.partial' not in written[0]
    Image.open(tmp_path / written[0]).load()  # whole


def test_ctrl_c_inside_the_graph_is_one_line(trained, tmp_path):
    """A SIGINT that lands while nnabla runs one of cpu_functions' Python functions (where a
    KeyboardInterrupt would come out of nnabla as a SystemError) ends at once, with one line
    and nothing written."""
    code, _, stderr = run_evaluate_patched(
        'import os, signal\n'
        'from cpu_engine import functions as cpu_functions\n'
        'forward = cpu_functions._InstanceNormalization.forward_impl\n'
        'def forward_then_stop(*args):\n'
        '    os.kill(os.getpid(), signal.SIGINT)\n'
        '    forward(*args)\n'
        'cpu_functions._InstanceNormalization.forward_impl = forward_then_stop\n',
        '--model-save-path',
        str(trained),
        '--dataroot',
        SAMPLE,
        '--phase',
        'train',
        '--out',
        str(tmp_path),
    )
    assert code == 130
    assert 'Traceback' not in stderr
    assert stderr.strip().splitlines()[-1] == 'evaluate.py: stopped by SIGINT'
    assert os.listdir(tmp_path) == []
