"""mask_predictor.py, train_masks.py and datasets/ccp.py's split and instance rule, on tiny
hand-made masks and a tiny CCP look-alike."""

import json
import os
import signal
from pathlib import Path

import h5py
import nnabla as nn
import nnabla.solvers as S
import numpy as np
import pytest
from PIL import Image
from test_generate_ccp_dataset import (
    JEANS,
    LABELS,
    SKIRT,
    SPLIT_LEVEL,
    SPLIT_PIXEL_LEVEL,
    TWO_BLOBS,
    generate,
    label_map,
    write_ccp,
)

import mask_predictor as mp
import train_masks
from datasets import ccp


def box(shape, top, bottom, left, right):
    mask = np.zeros(shape, bool)
    mask[top:bottom, left:right] = True
    return mask


# --- the network --------------------------------------------------------------------------


@pytest.mark.parametrize('levels, size', [(1, (6, 10)), (3, (16, 24)), (5, (144, 96))])
def test_logits_have_one_plane_per_class_at_the_input_size(levels, size):
    image = nn.Variable((2, 3) + size)
    logits = mp.predictor_logits(image, 3, width=4, levels=levels)
    assert logits.shape == (2, 3) + size
    image.d = np.random.RandomState(0).uniform(-1, 1, image.shape)
    logits.forward()
    assert np.isfinite(logits.d).all()


def test_parameters_live_under_the_predictor_scope():
    mp.predictor_logits(nn.Variable((1, 3, 8, 8)), 2, width=4, levels=2)
    names = list(nn.get_parameters(grad_only=False))
    assert names and all(name.startswith(mp.SCOPE + '/') for name in names)


@pytest.mark.parametrize('size, levels', [((12, 16), 4), ((16, 20), 4), ((16,), 1), ((4, 8), 4)])
def test_sizes_the_unet_cannot_halve_are_refused(size, levels):
    with pytest.raises(ValueError, match='multiples of'):
        mp.check_size(size, levels)


def test_a_short_training_run_on_synthetic_photos_lowers_the_loss():
    """Class 1 is a bright square, class 2 a dark one, on noise."""
    rng = np.random.RandomState(0)
    batch, size, n_classes = 4, (16, 16), 3
    images = rng.uniform(-0.3, 0.3, (8, 3) + size).astype(np.float32)
    labels = np.zeros((8, 1) + size, np.int32)
    for index in range(8):
        for value, label in [(0.9, 1), (-0.9, 2)]:
            top, left = rng.randint(0, 11, 2)
            images[index, :, top : top + 5, left : left + 5] = value
            labels[index, 0, top : top + 5, left : left + 5] = label
    image = nn.Variable((batch, 3) + size)
    target = nn.Variable((batch, 1) + size)
    one_hot = nn.Variable((batch, n_classes) + size)
    loss = mp.segmentation_loss(mp.predictor_logits(image, n_classes, width=4, levels=2), target, one_hot)
    solver = S.Adam(1e-2)
    solver.set_parameters(nn.get_parameters())
    losses = []
    for step in range(40):
        chosen = np.arange(step * batch, (step + 1) * batch) % 8
        image.d, target.d = images[chosen], labels[chosen]
        one_hot.d = mp.one_hot_planes(labels[chosen], n_classes)
        loss.forward()
        solver.zero_grad()
        loss.backward()
        solver.update()
        losses.append(float(loss.d))
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])


def test_one_hot_planes_mark_each_pixel_once():
    labels = np.array([[[[0, 1], [2, 1]]]])
    planes = mp.one_hot_planes(labels, 3)
    assert planes.shape == (1, 3, 2, 2)
    np.testing.assert_array_equal(planes.sum(axis=1), 1)
    np.testing.assert_array_equal(planes[0, 1], [[0, 1], [0, 1]])


def test_label_resizing_never_blends_labels():
    labels = np.arange(12).reshape(3, 4) * 5
    resized = mp.resize_labels(labels, (7, 9))
    assert resized.shape == (7, 9)
    assert set(np.unique(resized)) <= set(labels.ravel())
    np.testing.assert_array_equal(mp.resize_labels(labels, (6, 8))[::2, ::2], labels)


# --- a predictor, saved and loaded, on photos of any size -----------------------------------


@pytest.fixture
def saved_predictor(tmp_path):
    """A random predictor of two categories written as train_masks.py exports one."""
    args = train_masks.get_args(['--size', '8', '12', '--levels', '2', '--width', '4'])
    mp.predictor_logits(nn.Variable((1, 3, 8, 12)), 3, args.width, args.levels)
    train_masks.export_predictor(tmp_path / 'predictor', args)
    nn.clear_parameters()
    return tmp_path / 'predictor'


def test_saved_predictor_loads_with_its_configuration(saved_predictor):
    predictor = mp.load_predictor(saved_predictor)
    assert (predictor.categories, predictor.size, predictor.width, predictor.levels) == (
        ('jeans', 'skirt'),
        (8, 12),
        4,
        2,
    )


@pytest.mark.parametrize('split', [False, True])
def test_predict_masks_answers_at_the_photo_resolution(saved_predictor, split):
    predictor = mp.load_predictor(saved_predictor)
    photo = np.random.RandomState(1).randint(0, 256, (37, 23, 3)).astype(np.uint8)
    found = mp.predict_masks(predictor, photo, split_instances=split, min_instance_area=0.01)
    assert list(found) == ['jeans', 'skirt']
    labels = mp.predict_labels(predictor, photo)
    assert labels.shape == (37, 23)
    for index, category in enumerate(['jeans', 'skirt'], start=1):
        masks = found[category]
        assert masks.region.shape == (37, 23) and masks.region.dtype == bool
        np.testing.assert_array_equal(masks.region, labels == index)
        expected = ccp.instance_masks(labels == index, split, 0.01)
        assert len(masks.instances) == len(expected)
        for mine, theirs in zip(masks.instances, expected):
            np.testing.assert_array_equal(mine, theirs)
    assert not (found['jeans'].region & found['skirt'].region).any()


@pytest.mark.parametrize(
    'change, message',
    [
        (lambda c: c.update(categories=[]), 'categories'),
        (lambda c: c.update(categories=['jeans', 'jeans']), 'categories'),
        (lambda c: c.update(categories='jeans'), 'categories'),
        (lambda c: c.update(size=[8, 12.5]), 'integers'),
        (lambda c: c.update(size=[8, 13]), 'multiples'),
        (lambda c: c.update(width=True), 'integers'),
        (lambda c: c.update(width=0), 'width'),
        (lambda c: c.update(levels=20), 'levels'),
        (lambda c: c.pop('levels'), 'levels'),
    ],
)
def test_bad_configurations_are_refused(saved_predictor, change, message):
    path = saved_predictor / mp.CONFIG
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        mp.load_predictor(saved_predictor)


@pytest.mark.parametrize(
    'edit, message',
    [
        (
            lambda: nn.parameter.pop_parameter('mask_predictor/classifier/conv/b'),
            'parameters.h5 lacks mask_predictor/classifier/conv/b',
        ),
        (
            lambda: nn.parameter.get_parameter_or_create('mask_predictor/extra', (1,)),
            'parameters.h5 holds a parameter the network lacks: mask_predictor/extra',
        ),
        (
            lambda: nn.parameter.set_parameter(
                'mask_predictor/classifier/conv/b', nn.Variable.from_numpy_array(np.zeros(4))
            ),
            r'classifier/conv/b is \(4,\), the network needs \(3,\)',
        ),
    ],
)
def test_parameters_that_are_not_the_network_are_refused(saved_predictor, edit, message):
    """A parameter left at its random start would predict noise without a word."""
    nn.load_parameters(str(saved_predictor / 'parameters.h5'))
    edit()
    nn.save_parameters(str(saved_predictor / 'parameters.h5'))
    nn.clear_parameters()
    with pytest.raises(ValueError, match=message):
        mp.load_predictor(saved_predictor)


# --- the measures, on hand-made masks --------------------------------------------------------


def test_iou_of_overlapping_squares():
    annotated, predicted = box((10, 10), 0, 4, 0, 4), box((10, 10), 2, 6, 0, 4)
    assert mp.iou(predicted, annotated) == pytest.approx(8 / 24)
    assert mp.iou(annotated, annotated) == 1.0
    assert mp.iou(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 1.0
    assert mp.iou(np.zeros((3, 3), bool), np.ones((3, 3), bool)) == 0.0


def test_iou_pools_pixels_over_photos():
    a = [box((10, 10), 0, 4, 0, 4), np.zeros((10, 10), bool)]
    p = [box((10, 10), 0, 4, 0, 2), box((10, 10), 0, 1, 0, 8)]
    # overlap 8 + 0, union 16 + 8
    assert mp.iou(p, a) == pytest.approx(8 / 24)
    # photos of different sizes
    assert mp.iou([p[0], box((3, 5), 0, 1, 0, 1)], [a[0], box((3, 5), 0, 1, 0, 1)]) == pytest.approx(9 / 17)


def test_instance_count_accuracy():
    assert mp.instance_count_accuracy([1, 0, 2, 1], [1, 1, 2, 0]) == 0.5
    with pytest.raises(ValueError):
        mp.instance_count_accuracy([1], [1, 2])


def test_instance_counts_of_hand_made_masks_follow_the_ccp_rule():
    annotated = label_map(*[(JEANS, *b) for b in TWO_BLOBS]) == JEANS
    one_blob = label_map((JEANS, *TWO_BLOBS[0])) == JEANS
    counts = [
        [len(ccp.instance_masks(mask, True, 0.05)) for mask in pair]
        for pair in [(annotated, annotated), (one_blob, annotated)]
    ]
    assert counts == [[2, 2], [1, 2]]
    assert mp.instance_count_accuracy(*zip(*counts)) == 0.5


def test_boundary_marks_the_outline():
    mask = box((6, 6), 1, 5, 1, 5)
    expected = mask.copy()
    expected[2:4, 2:4] = False
    np.testing.assert_array_equal(mp.boundary(mask), expected)
    np.testing.assert_array_equal(
        mp.boundary(np.ones((3, 3), bool)), ~box((3, 3), 1, 2, 1, 2)
    )  # the photo's edge is a boundary


def test_boundary_f_score_of_a_square_shifted_by_one_row():
    annotated, predicted = box((10, 10), 2, 6, 2, 6), box((10, 10), 3, 7, 2, 6)
    # Of the 12 outline pixels of each, 6 lie on the other's outline: rows 3-5 of both sides.
    assert mp.boundary_f_score(predicted, annotated, tolerance=0) == pytest.approx(0.5)
    assert mp.boundary_f_score(predicted, annotated, tolerance=1) == 1.0
    assert mp.boundary_f_score(annotated, annotated, tolerance=0) == 1.0


def test_boundary_f_score_of_distant_or_missing_masks():
    annotated, far = box((20, 20), 0, 4, 0, 4), box((20, 20), 12, 16, 12, 16)
    assert mp.boundary_f_score(far, annotated, tolerance=2) == 0.0
    empty = np.zeros((20, 20), bool)
    assert mp.boundary_f_score(empty, annotated) == 0.0
    assert mp.boundary_f_score(annotated, empty) == 0.0
    assert mp.boundary_f_score(empty, empty) == 1.0


def test_boundary_f_score_counts_precision_and_recall_apart():
    """A prediction inside the annotation: all its outline is near, half the annotation's not."""
    annotated, predicted = box((20, 20), 0, 10, 0, 20), box((20, 20), 0, 10, 0, 3)
    # predicted outline: 10 + 10 + 1 (row 0 col 1) + 1 (row 9 col 1) = 22 pixels, all within
    # 2 px of the annotation's; annotated outline: 20 + 20 + 8 + 8 = 56, of which rows 0 and
    # 9 at columns 0-4 and column 0 rows 1-8 are within 2 px of the prediction's.
    precision, recall = 1.0, (5 + 5 + 8) / 56
    assert mp.boundary_f_score(predicted, annotated, tolerance=2) == pytest.approx(
        2 * precision * recall / (precision + recall)
    )


# --- the shared CCP rules --------------------------------------------------------------------


def test_connected_region_rule():
    regions = {name: labels == JEANS for name, labels in SPLIT_PIXEL_LEVEL.items()}
    counts = {name: len(ccp.instance_masks(region, True, 0.05)) for name, region in regions.items()}
    # two blobs and a dropped speck; a corner touch joins (8-connectivity); too small
    assert counts == {'0001': 2, '0002': 1, '0003': 0, '0004': 0}
    assert [len(ccp.instance_masks(region, False, 0.05)) for region in regions.values()] == [1, 1, 1, 0]
    first, second = ccp.instance_masks(regions['0001'], True, 0.05)
    np.testing.assert_array_equal(first, label_map((JEANS, *TWO_BLOBS[0])) == JEANS)
    np.testing.assert_array_equal(second, label_map((JEANS, *TWO_BLOBS[1])) == JEANS)


@pytest.mark.parametrize('fraction, seed', [(0.3, 0), (0.5, 7)])
def test_held_out_names_are_the_test_folders_of_generate_ccp_dataset(tmp_path, fraction, seed):
    root = write_ccp(tmp_path / 'ccp', SPLIT_LEVEL, {})
    generate(root, tmp_path / 'out', test_fraction=fraction, split_seed=seed)
    label_maps = ccp.read_label_maps(root)
    assert list(label_maps) == sorted(SPLIT_LEVEL)
    for label, folder in [(JEANS, 'testA'), (SKIRT, 'testB')]:
        written = {path.stem for path in (tmp_path / 'out' / folder).iterdir()}
        assert written and ccp.held_out_names(label_maps, label, fraction, seed) == written
    assert ccp.held_out_names(label_maps, JEANS, 0, seed) == frozenset()


def test_unknown_category_lists_the_valid_ones():
    with pytest.raises(ccp.DatasetError, match="'boots': unknown.*bag, clogs, jeans"):
        ccp.label_of(LABELS, 'boots')
    assert ccp.label_of(LABELS, 'skirt') == SKIRT


def test_label_maps_that_are_not_label_ids_are_refused(tmp_path):
    root = write_ccp(tmp_path / 'ccp', {'0001': np.full((3, 3), 0.5)}, {})
    with pytest.raises(ccp.DatasetError, match='0001.mat: groundtruth is not'):
        ccp.read_label_maps(root)


def test_the_dice_term_covers_the_categories_only():
    """Cross-entropy over all four classes, Dice over classes 1 and 2 (one_hot's planes)."""
    rng = np.random.RandomState(2)
    logits = rng.normal(size=(2, 4, 3, 5)).astype(np.float32)
    labels = rng.randint(0, 4, (2, 1, 3, 5))
    one_hot = mp.one_hot_planes(labels, 3)
    loss = mp.segmentation_loss(
        nn.Variable.from_numpy_array(logits),
        nn.Variable.from_numpy_array(labels),
        nn.Variable.from_numpy_array(one_hot),
    )
    loss.forward()
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    cross_entropy = -np.mean(np.log(np.take_along_axis(probabilities, labels, axis=1)))
    overlap = (probabilities[:, 1:3] * one_hot[:, 1:]).sum(axis=(0, 2, 3))
    total = probabilities[:, 1:3].sum(axis=(0, 2, 3)) + one_hot[:, 1:].sum(axis=(0, 2, 3))
    dice = np.mean(1 - (2 * overlap + 1) / (total + 1))
    assert float(loss.d) == pytest.approx(cross_entropy + dice, rel=1e-5)


def predictor_favouring(folder, other_categories, favoured):
    """A predictor folder whose classifier bias makes class `favoured` win at every pixel."""
    args = train_masks.get_args(
        ['--size', '8', '8', '--levels', '2', '--width', '4', '--other-categories', *other_categories]
    )
    n_classes = 3 + len(other_categories)
    mp.predictor_logits(nn.Variable((1, 3, 8, 8)), n_classes, args.width, args.levels)
    with nn.parameter_scope(mp.SCOPE):
        bias = nn.get_parameters()['classifier/conv/b']
    bias.d = np.where(np.arange(n_classes) == favoured, 100.0, 0.0)
    train_masks.export_predictor(folder, args)
    nn.clear_parameters()
    return mp.load_predictor(folder)


def test_other_categories_are_learnt_as_classes_but_never_become_masks(tmp_path):
    photo = np.random.RandomState(3).randint(0, 256, (20, 14, 3)).astype(np.uint8)
    bag_wins = predictor_favouring(tmp_path / 'bag', ['bag', 'shirt'], favoured=3)
    assert bag_wins.categories == ('jeans', 'skirt') and bag_wins.other_categories == ('bag', 'shirt')
    assert mp.read_config(tmp_path / 'bag' / mp.CONFIG)[4] == ('bag', 'shirt')
    assert not mp.predict_labels(bag_wins, photo).any()
    found = mp.predict_masks(bag_wins, photo)
    assert list(found) == ['jeans', 'skirt'] and not any(m.instances for m in found.values())
    skirt_wins = predictor_favouring(tmp_path / 'skirt', ['bag', 'shirt'], favoured=2)
    assert (mp.predict_labels(skirt_wins, photo) == 2).all()


def test_a_configuration_naming_a_category_twice_across_both_lists_is_refused(tmp_path):
    predictor_favouring(tmp_path / 'p', ['bag'], favoured=0)
    config = json.loads((tmp_path / 'p' / mp.CONFIG).read_text())
    config['other_categories'] = ['jeans']
    (tmp_path / 'p' / mp.CONFIG).write_text(json.dumps(config))
    with pytest.raises(ValueError, match='distinct'):
        mp.load_predictor(tmp_path / 'p')


@pytest.mark.parametrize('flags', [['skirt'], ['bag', 'bag'], ['all', 'bag']])
def test_other_categories_flags_that_repeat_a_category_are_refused(flags, capsys):
    with pytest.raises(SystemExit):
        train_masks.get_args(['--other-categories', *flags])
    assert '--other-categories: each category once' in capsys.readouterr().err


# --- train_masks.py on a CCP look-alike ------------------------------------------------------


def test_epoch_order_is_seeded_and_balances_the_photos():
    classes = np.zeros((10, 2, 2), np.uint8)
    classes[[1, 4, 7], 0, 0] = 1
    classes[[2, 5], 1, 1] = 2  # another category's class: not a photo showing a category
    order = train_masks.epoch_order(classes, 1, 1.0, seed=3, epoch=2)
    assert len(order) == 6 and {1, 4, 7} <= set(order) and len(set(order)) == 6
    np.testing.assert_array_equal(order, train_masks.epoch_order(classes, 1, 1.0, 3, 2))
    assert len(train_masks.epoch_order(classes, 1, 5.0, 3, 2)) == 10
    assert len(train_masks.epoch_order(classes, 2, 1.0, 3, 2)) == 10


def training_flags(tmp_path, root):
    return [
        '--data_root',
        str(root),
        '-o',
        str(tmp_path / 'models'),
        '-m',
        str(tmp_path / 'monitor'),
        '--size',
        '16',
        '16',
        '--levels',
        '2',
        '--width',
        '4',
        '-b',
        '2',
        '--log-step',
        '1',
        '--test-fraction',
        '0.3',
        '--cases-image',
        str(tmp_path / 'cases.png'),
    ]


def test_train_resume_and_evaluate(tmp_path, capsys):
    root = write_ccp(tmp_path / 'ccp', SPLIT_LEVEL, {})
    flags = training_flags(tmp_path, root) + ['--eval-interval', '1']
    train_masks.main(flags + ['--max-epoch', '1'])
    out = capsys.readouterr().out
    assert 'training photos: 10; held out: 5 (jeans 2, skirt 3)' in out
    assert 'jeans: IoU' in out and 'skirt: IoU' in out
    with pytest.raises(
        SystemExit,
        match=(
            r'models holds another run \(checkpoint_000000005, predictor\): continue it with '
            '--resume, or delete its files with --overwrite'
        ),
    ):
        train_masks.main(flags + ['--max-epoch', '2'])
    nn.clear_parameters()
    train_masks.main(flags + ['--max-epoch', '2', '--resume'])
    assert 'resumed at epoch 1, iteration 5' in capsys.readouterr().out
    lines = (tmp_path / 'monitor' / 'loss.series.txt').read_text().split('\n')[:-1]
    assert [int(line.split()[0]) for line in lines] == list(range(10))
    assert (tmp_path / 'monitor' / 'heldout_iou_skirt.series.txt').read_text().count('\n') == 2
    assert (tmp_path / 'monitor' / 'run.json').exists()
    assert 'max_epoch: 2' in (tmp_path / 'monitor' / 'Arguments.txt').read_text()
    assert not list(tmp_path.rglob('train.lock'))
    predictor = mp.load_predictor(tmp_path / 'models' / 'predictor')
    assert predictor.size == (16, 16) and predictor.categories == ('jeans', 'skirt')
    with Image.open(tmp_path / 'cases.png') as cases:
        assert cases.size == (3 * 144, 5 * 216)  # the 3 best, then the other 2

    nn.clear_parameters()
    train_masks.main(flags + ['--evaluate', '--export', str(tmp_path / 'exported')])
    assert 'checkpoint_000000010: 2 epoch(s)' in capsys.readouterr().out
    assert mp.read_config(tmp_path / 'exported' / mp.CONFIG) == (('jeans', 'skirt'), (16, 16), 4, 2, ())
    with pytest.raises(SystemExit, match=r'other --width \(4, now 8\)'):
        train_masks.main(
            [('8' if flag == '4' else flag) for flag in flags] + ['--resume', '--max-epoch', '3']
        )

    nn.clear_parameters()
    train_masks.main(flags + ['--max-epoch', '1', '--overwrite'])
    assert sorted(os.listdir(tmp_path / 'models')) == ['checkpoint_000000005', 'predictor']
    lines = (tmp_path / 'monitor' / 'loss.series.txt').read_text().split('\n')[:-1]
    assert [int(line.split()[0]) for line in lines] == list(range(5))


def test_other_categories_all_learns_every_other_labelled_one_and_holds_out_the_same_photos(tmp_path, capsys):
    BAG, SHIRT = LABELS.index('bag'), LABELS.index('shirt')
    label_maps = dict(SPLIT_LEVEL)
    label_maps['0002'] = label_map((JEANS, 0, 4), (BAG, 10, 12))
    label_maps['0010'] = label_map((SKIRT, 6, 10), (SHIRT, 0, 3))
    root = write_ccp(tmp_path / 'ccp', label_maps, {})
    flags = training_flags(tmp_path, root) + ['--eval-interval', '0', '--max-epoch', '1']
    train_masks.main(flags + ['--other-categories', 'all'])
    assert 'training photos: 10; held out: 5 (jeans 2, skirt 3)' in capsys.readouterr().out
    predictor = mp.load_predictor(tmp_path / 'models' / 'predictor')
    assert predictor.other_categories == ('bag', 'shirt')  # clogs: in no pixel-level annotation
    with nn.parameter_scope(mp.SCOPE):
        assert nn.get_parameters()['classifier/conv/b'].shape == (5,)
    nn.clear_parameters()
    with pytest.raises(SystemExit, match=r"other --other-categories \(\['bag', 'shirt'\], now \[\]\)"):
        train_masks.main(flags + ['--resume', '--max-epoch', '2', '--other-categories'])


def parameters_of(folder):
    with h5py.File(folder / 'parameters.h5', 'r') as f:
        arrays = {}
        f.visititems(
            lambda name, item: arrays.update({name: item[()]}) if isinstance(item, h5py.Dataset) else None
        )
    return arrays


def test_a_stop_saves_a_checkpoint_and_resuming_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    """SIGINT during iteration 3 of the first epoch (of 5): a checkpoint after it, exit status
    130; --resume then ends where a run never stopped ends, series included."""
    root = write_ccp(tmp_path / 'ccp', SPLIT_LEVEL, {})
    whole, stopped = tmp_path / 'whole', tmp_path / 'stopped'
    train_masks.main(training_flags(whole, root) + ['--max-epoch', '2', '--eval-interval', '0'])

    one_hot_planes, calls = mp.one_hot_planes, []

    def stop_at_the_third(*args):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return one_hot_planes(*args)

    flags = training_flags(stopped, root) + ['--max-epoch', '2', '--eval-interval', '0']
    monkeypatch.setattr(mp, 'one_hot_planes', stop_at_the_third)
    nn.clear_parameters()
    with pytest.raises(SystemExit) as stop:
        train_masks.main(flags)
    assert stop.value.code == 130
    assert os.listdir(stopped / 'models') == ['checkpoint_000000003']
    assert not list(stopped.rglob('train.lock'))
    monkeypatch.undo()
    nn.clear_parameters()
    train_masks.main(flags + ['--resume'])
    for name in ['loss.series.txt', 'epoch_time.series.txt']:
        assert len((stopped / 'monitor' / name).read_text().splitlines()) == len(
            (whole / 'monitor' / name).read_text().splitlines()
        )
    np.testing.assert_allclose(
        np.loadtxt(stopped / 'monitor' / 'loss.series.txt'),
        np.loadtxt(whole / 'monitor' / 'loss.series.txt'),
        rtol=1e-5,
    )
    expected = parameters_of(whole / 'models' / 'predictor')
    for name, value in parameters_of(stopped / 'models' / 'predictor').items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-4, atol=1e-6)


def test_evaluate_a_predictor_folder(saved_predictor, tmp_path, capsys):
    root = write_ccp(tmp_path / 'ccp', SPLIT_LEVEL, {})
    train_masks.main(
        [
            '--data_root',
            str(root),
            '-o',
            str(saved_predictor),
            '--evaluate',
            '--test-fraction',
            '0.3',
            '--cases-image',
            str(tmp_path / 'cases.png'),
        ]
    )
    out = capsys.readouterr().out
    assert f'{saved_predictor}: predictor of jeans, skirt at 8x12' in out
    assert 'held-out photos: 5' in out and 'skirt: IoU' in out
    with pytest.raises(SystemExit, match='neither a checkpoint nor predictor.json in'):
        train_masks.main(['--data_root', str(root), '-o', str(tmp_path), '--evaluate'])


def test_the_shipped_predictor_finds_masks_on_a_bundled_photo():
    folder = Path(__file__).resolve().parents[1] / 'pretrained' / 'mask_predictor'
    predictor = mp.load_predictor(folder)
    assert predictor.categories == ('jeans', 'skirt')
    sample = folder.parents[1] / 'datasets' / 'ccp_sample' / 'trainA' / '0016.png'  # jeans
    with Image.open(sample) as image:
        photo = np.asarray(image.convert('RGB'))
    found = mp.predict_masks(predictor, photo)
    assert found['jeans'].region.shape == photo.shape[:2]
    assert len(found['jeans'].instances) == 1 and found['jeans'].region.mean() > 0.03
    assert all(len(masks.instances) <= 1 for masks in found.values())
