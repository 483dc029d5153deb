"""Sequential mini-batch translation (paper section 2.3) and translate.py end to end."""

import math
import os
import shutil
import subprocess
import sys

import nnabla as nn
import numpy as np
import pytest
from PIL import Image
from test_models import random_inputs
from test_train import TINY
from test_translate_predicted import save_predictor

import models
import train
from args import get_args
from conftest import ROOT
from runtime.checkpoints import checkpoint_paths

MULTI_SAMPLE = os.path.join(ROOT, 'datasets', 'ccp_multi_sample')


def build_pass(batch, slots, seed=0):
    nn.seed(seed)
    image, masks = nn.Variable((batch, 3, 32, 32)), nn.Variable((batch, slots, 32, 32))
    with nn.parameter_scope('generator'):
        outputs = models.generator_pass(image, masks, ngf=8, n_blocks=1)
    return image, masks, outputs


def test_samples_without_instances_in_the_pass_keep_their_image():
    image, masks, (image_out, masks_out, active) = build_pass(batch=2, slots=2)
    image.d, masks.d = random_inputs(2, 2, empty={(1, 0), (1, 1)})
    nn.forward_all([image_out, masks_out, active])
    np.testing.assert_array_equal(active.d, [1, 0])
    np.testing.assert_array_equal(image_out.d[1], image.d[1])
    assert np.all(masks_out.d[1] == -1)
    assert np.abs(image_out.d[0] - image.d[0]).max() > 1e-3


def test_one_pass_over_all_slots_is_the_one_pass_generator():
    image, masks, (image_out, masks_out, _) = build_pass(batch=2, slots=3)
    with nn.parameter_scope('generator'):
        plain_image, plain_masks = models.generator(image, masks, ngf=8, n_blocks=1)
    image.d, masks.d = random_inputs(2, 3, empty={(0, 2)})
    nn.forward_all([image_out, masks_out, plain_image, plain_masks])
    np.testing.assert_array_equal(image_out.d, plain_image.d)
    np.testing.assert_array_equal(masks_out.d, plain_masks.d)


@pytest.mark.parametrize('ins_per', [1, 2, 3, 4])
@pytest.mark.parametrize('instances', [1, 3, 4])
def test_number_of_passes_is_the_instance_count_over_k(ins_per, instances):
    nn.clear_parameters()
    args = get_args(TINY + ['--ins-max', '4', '--ins-per', str(ins_per), '--batch-size', '2'])
    trainer = train.Trainer(args, ins_max=4)
    trainer.set_epoch(0)
    assert len(trainer.passes) == math.ceil(4 / ins_per)
    images, masks = {}, {}
    for i, d in enumerate('xy'):
        # sample 0 has `instances` instances, sample 1 only one; the rest of the slots is empty
        empty = {(0, n) for n in range(instances, 4)} | {(1, n) for n in range(1, 4)}
        image, mask = random_inputs(2, 4, empty=empty, seed=i)
        images[d], masks[d] = image[:, :, :32, :24], mask[:, :, :32, :24]
    losses, passes_run, visuals = trainer.step(images, masks, iteration=0)
    assert passes_run == math.ceil(instances / ins_per)
    assert set(losses) == {f'{name}_{d}' for name in train.LOSS_NAMES for d in 'xy'}
    assert all(np.isfinite(v) for v in losses.values())
    # the tile shows every slot translated so far: slots beyond the instances stay empty
    translated_masks = visuals['x'][1][1]
    assert np.all(translated_masks[0, instances:] == -1) and np.all(translated_masks[1, 1:] == -1)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A checkpoint of one tiny epoch on the multi-instance sample, 2 slots per pass."""
    path = tmp_path_factory.mktemp('run')
    nn.clear_parameters()
    train.main(
        TINY
        + [
            '--dataroot',
            MULTI_SAMPLE,
            '--ins-max',
            '4',
            '--ins-per',
            '2',
            '--max-epoch',
            '1',
            '--monitor-path',
            str(path / 'monitor'),
            '--model-save-path',
            str(path / 'models'),
        ]
    )
    return path


def translate(*args):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'translate.py')] + list(args),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result.returncode, result.stderr


def test_training_on_many_instances_writes_tiles(trained):
    tile = trained / 'monitor' / 'translation_x2y_epoch_0001.png'
    assert tile.exists()


def test_translate_a_dataset_folder_deterministically(trained, tmp_path):
    for out in ['first', 'second']:
        code, stderr = translate(
            '--model-save-path',
            str(trained / 'models'),
            '--dataroot',
            MULTI_SAMPLE,
            '--phase',
            'train',
            '--direction',
            'BtoA',
            '--out',
            str(tmp_path / out),
        )
        assert code == 0, stderr
    names = sorted(os.listdir(tmp_path / 'first'))
    images = sorted(os.listdir(os.path.join(MULTI_SAMPLE, 'trainB')))
    for image in images:
        stem = os.path.splitext(image)[0]
        instances = len(
            [n for n in os.listdir(os.path.join(MULTI_SAMPLE, 'trainB_seg')) if n.startswith(stem + '_')]
        )
        assert {stem + '.png', stem + '_tile.png'} <= set(names)
        assert {f'{stem}_{i}.png' for i in range(instances)} <= set(names)
        source = Image.open(os.path.join(MULTI_SAMPLE, 'trainB', image))
        assert Image.open(tmp_path / 'first' / (stem + '.png')).size == source.size
    index = (tmp_path / 'first' / 'index.html').read_text()
    assert all(os.path.splitext(i)[0] + '_tile.png' in index for i in images)
    assert names == sorted(os.listdir(tmp_path / 'second'))
    for name in names:
        assert (tmp_path / 'first' / name).read_bytes() == (tmp_path / 'second' / name).read_bytes()


def test_translate_reports_each_bad_input_and_runs_the_rest(trained, tmp_path):
    good = os.path.join(MULTI_SAMPLE, 'trainA')
    inputs = tmp_path / 'inputs'
    shutil.copytree(good, inputs / 'valA')
    shutil.copytree(good + '_seg', inputs / 'valA_seg')
    names = sorted(os.listdir(inputs / 'valA'))
    no_masks, corrupt, wrong_size = names[:3]
    for mask in (inputs / 'valA_seg').glob(os.path.splitext(no_masks)[0] + '_*'):
        mask.unlink()
    (inputs / 'valA' / corrupt).write_bytes(b'not a png')
    wrong_mask = inputs / 'valA_seg' / (os.path.splitext(wrong_size)[0] + '_0.png')
    Image.new('L', (10, 10)).save(wrong_mask)
    predictor = save_predictor(tmp_path / 'predictor', 'nothing')
    code, stderr = translate(
        '--model-save-path',
        str(trained / 'models'),
        '--dataroot',
        str(inputs),
        '--phase',
        'val',
        '--out',
        str(tmp_path / 'out'),
        '--source-category',
        'jeans',
        '--mask-predictor',
        str(predictor),
    )
    assert code == 1
    lines = [line for line in stderr.splitlines() if line.startswith('translate.py:')]
    assert lines[-1] == f'translate.py: 3 of {len(names)} inputs failed'
    assert (
        'translate.py: {}: the mask predictor ({}) finds no jeans in it; not translated'.format(
            inputs / 'valA' / no_masks, predictor
        )
        in lines
    )
    assert any(
        line.startswith(f'translate.py: {inputs / "valA" / corrupt}: unreadable image') for line in lines
    )
    assert f'translate.py: {wrong_mask}: mask is 10x10 (WxH) but its image is 220x330' in lines
    assert len([n for n in os.listdir(tmp_path / 'out') if n.endswith('_tile.png')]) == len(names) - 3


def test_translate_one_image_and_refuse_other_network_sizes(trained, tmp_path):
    image = os.path.join(MULTI_SAMPLE, 'trainA', sorted(os.listdir(os.path.join(MULTI_SAMPLE, 'trainA')))[0])
    stem = os.path.splitext(os.path.basename(image))[0]
    masks = sorted(
        str(p)
        for p in (
            os.path.join(MULTI_SAMPLE, 'trainA_seg', n)
            for n in os.listdir(os.path.join(MULTI_SAMPLE, 'trainA_seg'))
        )
        if os.path.basename(p).startswith(stem + '_')
    )
    code, stderr = translate(
        '--model-save-path',
        str(trained / 'models'),
        '--image',
        image,
        '--masks',
        *masks,
        '--ins-per',
        '1',
        '--out',
        str(tmp_path / 'one'),
    )
    assert code == 0, stderr
    assert (tmp_path / 'one' / (stem + '_tile.png')).exists()
    checkpoint = checkpoint_paths(str(trained / 'models'))[-1]
    code, stderr = translate(
        '--model-save-path', str(trained / 'models'), '--image', image, '--out', str(tmp_path / 'none')
    )
    assert code == 1
    assert stderr.strip().splitlines()[-1] == (
        f'translate.py: {image} has no masks: to predict them, give --source-category, the '
        'category of domain A (no categories.json beside {} names it)'.format(
            os.path.join(checkpoint, 'parameters.h5')
        )
    )
    for flags, made in [(['--ngf', '8'], '--ngf 4'), (['--n-blocks', '2'], '--n-blocks 1')]:
        code, stderr = translate(
            '--model-save-path',
            str(trained / 'models'),
            '--image',
            image,
            '--masks',
            *masks,
            '--out',
            str(tmp_path / 'x'),
            *flags,
        )
        assert code == 1
        assert stderr.strip().splitlines()[-1] == (
            'translate.py: {} was made with {}, not {}'.format(
                os.path.join(checkpoint, 'parameters.h5'), made, ' '.join(flags)
            )
        )


def test_pretrained_generators_translate_the_bundled_sample(tmp_path):
    """What `make translate` runs: the committed 64x44 model still fits the code."""
    params = os.path.join(ROOT, 'pretrained', 'jeans2skirt_64x44', 'parameters.h5')
    for direction, held_out in [('AtoB', '0056'), ('BtoA', '0018')]:
        out = tmp_path / direction
        code, stderr = translate(
            '--params',
            params,
            '--direction',
            direction,
            '--dataroot',
            os.path.join(ROOT, 'datasets', 'ccp_sample'),
            '--phase',
            'train',
            '--out',
            str(out),
        )
        assert code == 0, stderr
        assert len(list(out.glob('*_full.png'))) == 8
        translated = np.asarray(Image.open(out / f'{held_out}.png'))
        assert translated.shape == (330, 220, 3) and translated.std() > 10
