"""translate.py and evaluate.py with masks from a mask predictor: tiny predictors built here
whose outcome is known (jeans nowhere, everywhere, or where the photo is red) and the tiny
random generators of test_translate.py."""

import json
import os

import nnabla as nn
import numpy as np
import pytest
from PIL import Image
from test_data import save_example
from test_evaluate import write_dataset
from test_translate import PHOTO, noise, save_generators

import evaluate
import mask_predictor as mp
import translate
from conftest import ROOT
from datasets import ccp

SIZE = (16, 16)  # the predictors' network size
BACKGROUND, RED = (40, 40, 40), (230, 20, 20)


@pytest.fixture(autouse=True)
def restore_context():
    """translate.main and evaluate.main set the default context for the whole process."""
    context = nn.get_current_context()
    yield
    nn.set_default_context(context)


def save_predictor(folder, finds):
    """A predictor folder of jeans and skirt with one U-Net level that labels jeans nowhere
    ('nothing'), everywhere ('everywhere') or where the photo is red ('red'): both
    convolutions pass the red channel on, instance-normalised and cut at its mean, and the
    classifier thresholds it."""
    folder.mkdir(parents=True)
    nn.clear_parameters()
    mp.predictor_logits(nn.Variable((1, 3) + SIZE), 3, width=2, levels=1)
    parameters = nn.get_parameters(grad_only=False)
    for value in parameters.values():
        value.d = 0
    parameters['mask_predictor/down0/conv1/conv/W'].d[0, 0, 1, 1] = 1
    parameters['mask_predictor/down0/conv2/conv/W'].d[0, 0, 1, 1] = 1
    weights, bias = (parameters[f'mask_predictor/classifier/conv/{n}'] for n in 'Wb')
    bias.d[2] = -10  # skirt: never
    if finds == 'nothing':
        bias.d[0] = 10
    elif finds == 'everywhere':
        bias.d[1] = 10
    else:
        weights.d[1, 0] = 10
        bias.d[1] = -5
    nn.save_parameters(str(folder / 'parameters.h5'))
    mp.write_config(folder, ['jeans', 'skirt'], SIZE, 2, 1)
    nn.clear_parameters()
    return folder


@pytest.fixture(scope='module')
def predictors(tmp_path_factory):
    root = tmp_path_factory.mktemp('predictors')
    return {finds: save_predictor(root / finds, finds) for finds in ['nothing', 'everywhere', 'red']}


@pytest.fixture(scope='module')
def model(tmp_path_factory):
    """Generators with a categories.json: A is jeans, B skirt."""
    params = save_generators(tmp_path_factory.mktemp('model') / 'jeans2skirt')
    (params.parent / 'categories.json').write_text(json.dumps({'A': 'jeans', 'B': 'skirt'}))
    return params.parent


def red_photo(*boxes):
    """A dark photo of PHOTO size with red (top, left, height, width) boxes."""
    photo = np.empty(PHOTO + (3,), np.uint8)
    photo[:] = BACKGROUND
    for top, left, height, width in boxes:
        photo[top : top + height, left : left + width] = RED
    return photo


def box(top, left, height, width):
    mask = np.zeros(PHOTO, bool)
    mask[top : top + height, left : left + width] = True
    return mask


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


def save_photo(path, photo):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo).save(path)
    return path


def read_mask(path):
    pixels = np.asarray(Image.open(path))
    assert pixels.shape == PHOTO and set(np.unique(pixels)) <= {0, 255}
    return pixels == 255


def run(*argv):
    """translate.main's exit code, None where it ended normally."""
    try:
        translate.main([str(a) for a in argv])
    except SystemExit as end:
        return end.code
    return None


def test_an_image_alone_is_translated_with_masks_it_writes(model, predictors, tmp_path, capsys):
    photo = save_photo(tmp_path / 'in' / 'p.png', red_photo((20, 20, 40, 30)))
    out = tmp_path / 'out'
    assert run('-o', model, '--image', photo, '--mask-predictor', predictors['red'], '--out', out) is None
    assert capsys.readouterr().err.splitlines()[-1] == (
        f'translate.py: no --masks: predicted 1 jeans instance(s) with {predictors["red"]}; '
        f'see {out}/p_mask_pred_*.png'
    )
    assert sorted(os.listdir(out)) == [
        'index.html',
        'p.png',
        'p_0.png',
        'p_full.png',
        'p_mask_pred_0.png',
        'p_tile.png',
    ]
    written = read_mask(out / 'p_mask_pred_0.png')
    predictor = mp.load_predictor(predictors['red'])
    np.testing.assert_array_equal(
        written, mp.source_instances(predictor, np.asarray(Image.open(photo)), 'jeans')[0]
    )
    assert iou(written, box(20, 20, 40, 30)) > 0.8

    # The masks used are the masks written: given back with --masks, the same translation.
    again = tmp_path / 'again'
    assert run('-o', model, '--image', photo, '--masks', out / 'p_mask_pred_0.png', '--out', again) is None
    assert not list(again.glob('*_mask_pred_*'))
    for name in ['p.png', 'p_0.png', 'p_full.png']:
        np.testing.assert_array_equal(
            np.asarray(Image.open(again / name)), np.asarray(Image.open(out / name))
        )


def test_given_masks_override_the_prediction(model, predictors, tmp_path):
    """An image with masks is translated with them, whatever the predictor would find."""
    root = tmp_path / 'photos'
    save_example(root, 'testA', 'a', noise(0), [box(10, 10, 30, 30)])
    assert (
        run(
            '-o',
            model,
            '--dataroot',
            root,
            '--mask-predictor',
            predictors['everywhere'],
            '--out',
            tmp_path / 'folder',
        )
        is None
    )
    assert (
        run(
            '-o',
            model,
            '--image',
            root / 'testA' / 'a.png',
            '--masks',
            root / 'testA_seg' / 'a_0.png',
            '--out',
            tmp_path / 'image',
        )
        is None
    )
    for out in ['folder', 'image']:
        assert sorted(os.listdir(tmp_path / out)) == [
            'a.png',
            'a_0.png',
            'a_full.png',
            'a_tile.png',
            'index.html',
        ]
    for name in ['a.png', 'a_0.png']:
        np.testing.assert_array_equal(
            np.asarray(Image.open(tmp_path / 'folder' / name)),
            np.asarray(Image.open(tmp_path / 'image' / name)),
        )


def test_no_instance_found_is_one_line_and_no_output(model, predictors, tmp_path, capsys):
    photo = save_photo(tmp_path / 'in' / 'p.png', red_photo())
    code = run(
        '-o', model, '--image', photo, '--mask-predictor', predictors['red'], '--out', tmp_path / 'out'
    )
    assert code == (
        f'translate.py: {photo}: the mask predictor ({predictors["red"]}) finds no '
        'jeans in it; not translated'
    )
    assert 'Traceback' not in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_a_folder_predicts_the_masks_its_photos_lack(model, predictors, tmp_path, capsys):
    root = tmp_path / 'photos'
    save_example(root, 'testA', 'a', noise(0), [box(10, 10, 30, 30)])  # has its mask
    save_photo(root / 'testA' / 'b.png', red_photo((40, 30, 30, 30)))  # jeans predicted
    save_photo(root / 'testA' / 'c.png', red_photo())  # none to find
    out = tmp_path / 'out'
    code = run('-o', model, '--dataroot', root, '--mask-predictor', predictors['red'], '--out', out)
    assert code == 'translate.py: 1 of 3 inputs failed'
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith('translate.py')]
    assert lines == [
        f'translate.py: 2 of 3 inputs have no masks in {root}/testA_seg: their jeans instances '
        f'are predicted with {predictors["red"]}',
        f'translate.py: {root}/testA/c.png: the mask predictor ({predictors["red"]}) finds no '
        'jeans in it; not translated',
    ]
    assert sorted(os.listdir(out)) == [
        'a.png',
        'a_0.png',
        'a_full.png',
        'a_tile.png',
        'b.png',
        'b_0.png',
        'b_full.png',
        'b_mask_pred_0.png',
        'b_tile.png',
        'index.html',
    ]
    assert iou(read_mask(out / 'b_mask_pred_0.png'), box(40, 30, 30, 30)) > 0.8


@pytest.mark.parametrize(
    'flags, expected',
    [
        ([], [[(20, 6, 30, 24), (50, 40, 40, 26)]]),  # both regions, one instance
        (['--split-instances'], [[(20, 6, 30, 24)], [(50, 40, 40, 26)]]),
        (['--split-instances', '--min-instance-area', '0.12'], [[(50, 40, 40, 26)]]),
    ],
)
def test_instances_are_connected_regions_with_split_instances(model, predictors, tmp_path, flags, expected):
    """The rule of generate_ccp_dataset.py: the region is one instance, or with
    --split-instances each 8-connected part of at least --min-instance-area of the photo (the
    boxes cover 10.9% and 15.0% of it)."""
    boxes = [(20, 6, 30, 24), (50, 40, 40, 26)]
    photo = save_photo(tmp_path / 'in' / 'p.png', red_photo(*boxes))
    out = tmp_path / 'out'
    assert (
        run('-o', model, '--image', photo, '--mask-predictor', predictors['red'], '--out', out, *flags)
        is None
    )
    written = sorted(out.glob('p_mask_pred_*.png'))
    assert [path.name for path in written] == [f'p_mask_pred_{k}.png' for k in range(len(expected))]
    for path, parts in zip(written, expected):
        assert iou(read_mask(path), np.any([box(*part) for part in parts], axis=0)) > 0.8
    region = mp.predict_masks(mp.load_predictor(predictors['red']), np.asarray(Image.open(photo)))[
        'jeans'
    ].region
    rule = ccp.instance_masks(
        region, '--split-instances' in flags, float(flags[-1]) if len(flags) == 3 else 0.002
    )
    for path, mask in zip(written, rule, strict=True):
        np.testing.assert_array_equal(read_mask(path), mask)


def test_the_source_category(model, predictors, tmp_path, capsys):
    """categories.json names the source category of each direction; --source-category wins;
    without either, predicting is refused in one line."""
    photo = save_photo(tmp_path / 'in' / 'p.png', noise(3))
    everywhere = predictors['everywhere']
    assert run(
        '-o',
        model,
        '--image',
        photo,
        '--mask-predictor',
        everywhere,
        '--direction',
        'BtoA',
        '--out',
        tmp_path / 'skirt',
    ) == (f'translate.py: {photo}: the mask predictor ({everywhere}) finds no skirt in it; not translated')
    assert (
        run(
            '-o',
            model,
            '--image',
            photo,
            '--mask-predictor',
            everywhere,
            '--direction',
            'BtoA',
            '--source-category',
            'jeans',
            '--out',
            tmp_path / 'jeans',
        )
        is None
    )
    assert read_mask(tmp_path / 'jeans' / 'p_mask_pred_0.png').all()
    assert run(
        '-o',
        model,
        '--image',
        photo,
        '--mask-predictor',
        everywhere,
        '--source-category',
        'boots',
        '--out',
        tmp_path / 'boots',
    ) == (f'translate.py: mask predictor {everywhere} finds jeans, skirt, not boots')

    bare = tmp_path / 'bare'
    bare.mkdir()
    (bare / 'parameters.h5').write_bytes((model / 'parameters.h5').read_bytes())
    (bare / 'state.json').write_bytes((model / 'state.json').read_bytes())
    assert run(
        '--params',
        bare / 'parameters.h5',
        '--image',
        photo,
        '--mask-predictor',
        everywhere,
        '--out',
        tmp_path / 'bare_out',
    ) == (
        f'translate.py: {photo} has no masks: to predict them, give --source-category, the '
        f'category of domain A (no categories.json beside {bare}/parameters.h5 names it)'
    )
    (model / 'categories.json').write_text('{"A": "jeans"}')
    try:
        code = run('-o', model, '--image', photo, '--out', tmp_path / 'damaged')
    finally:
        (model / 'categories.json').write_text(json.dumps({'A': 'jeans', 'B': 'skirt'}))
    assert code.startswith(f'translate.py: {model}/categories.json: unreadable or damaged')
    assert run(
        '-o', model, '--image', photo, '--mask-predictor', tmp_path / 'nowhere', '--out', tmp_path / 'x'
    ).startswith(
        f'translate.py: mask predictor {tmp_path}/nowhere: {tmp_path}/nowhere/predictor.json: '
        'not a mask predictor configuration'
    )
    assert not any((tmp_path / name).exists() for name in ['skirt', 'boots', 'bare_out', 'damaged', 'x'])


def test_a_predicted_name_taken_by_another_input_is_refused(model, predictors, tmp_path, capsys):
    """b's predicted mask b_mask_pred_0.png would overwrite the translation of the image
    b_mask_pred_0.png: b fails, the other is translated."""
    root = tmp_path / 'photos'
    save_photo(root / 'testA' / 'b.png', red_photo((40, 30, 30, 30)))
    save_example(root, 'testA', 'b_mask_pred_0', noise(1), [box(10, 10, 30, 30)])
    out = tmp_path / 'out'
    code = run('-o', model, '--dataroot', root, '--mask-predictor', predictors['red'], '--out', out)
    assert code == 'translate.py: 1 of 2 inputs failed'
    assert (
        f'translate.py: {root}/testA/b_mask_pred_0.png and {root}/testA/b.png would both '
        f'write {out}/b_mask_pred_0.png; rename one'
    ) in capsys.readouterr().err
    assert sorted(os.listdir(out)) == [
        'b_mask_pred_0.png',
        'b_mask_pred_0_0.png',
        'b_mask_pred_0_full.png',
        'b_mask_pred_0_tile.png',
        'index.html',
    ]
    assert np.asarray(Image.open(out / 'b_mask_pred_0.png')).ndim == 3  # the translation


# --- evaluate.py --predicted-masks ------------------------------------------------------------


def strip_dataset(root, red=True):
    """64x48 photos: in train, grey with a strip mask (A on the left, B on the right); in test
    the same, the strips drawn red where red, plus in each domain one grey photo whose strip
    the red predictor cannot see."""
    size = (64, 48)
    for phase, count in [('train', 6), ('test', 4)]:
        for domain, left in [('A', 6), ('B', 30)]:
            images, masks = [], []
            for index in range(count):
                mask = np.full(size, -1, np.float32)
                mask[10 + 2 * index : 50 + 2 * index, left + index : left + index + 12] = 1
                image = np.full((3,) + size, -0.6, np.float32)
                if phase == 'test' and red and index < 3:
                    image[:, mask > 0] = np.array([0.8, -0.8, -0.8])[:, None]
                images.append(image)
                masks.append(mask[None])
            write_dataset(root, phase, domain, images, masks)
    return root


def evaluate_json(*flags):
    evaluate.main([str(flag) for flag in flags] + ['--json'])


def test_evaluate_with_predicted_masks(model, predictors, tmp_path, capsys):
    root = strip_dataset(tmp_path / 'data')
    base = ['-o', model, '--dataroot', root, '--phase', 'test']
    evaluate_json(*base, '--out', tmp_path / 'annotated')
    annotated = json.loads(capsys.readouterr().out)
    assert annotated['masks'] == {'source': 'annotated'}

    evaluate_json(
        *base,
        '--out',
        tmp_path / 'predicted',
        '--predicted-masks',
        predictors['red'],
        '--categories',
        'jeans',
        'jeans',
    )
    report = json.loads(capsys.readouterr().out)
    assert report['masks'] == {
        'source': 'predicted',
        'predictor': str(predictors['red']),
        'categories': {'A': 'jeans', 'B': 'jeans'},
        'split_instances': False,
        'min_instance_area': 0.002,
    }
    assert report['classifier'] == annotated['classifier']  # fitted on the annotated masks
    for direction in evaluate.DIRECTIONS:
        figures = report[direction]
        assert set(figures) == set(annotated[direction]) | {
            'photos_without_instance',
            'predicted_region_iou',
            'domain_score_all_photos',
        }
        assert figures['images'] == figures['instances'] == 3
        assert figures['photos_without_instance'] == 1
        assert 0.6 < figures['predicted_region_iou'] < 1
        assert figures['domain_score_all_photos'] == pytest.approx(figures['domain_score'] * 3 / 4)
    tiles = sorted(os.listdir(tmp_path / 'predicted'))
    assert tiles == [
        'AtoB_000.png',
        'AtoB_001.png',
        'AtoB_002.png',
        'BtoA_000.png',
        'BtoA_001.png',
        'BtoA_002.png',
        'index.html',
    ]
    assert 'source masks: predicted by {} (jeans in A, jeans in B; each region one instance)'.format(
        predictors['red']
    ) in evaluate.format_table(report)
    assert 'photos without one (not scored)' in evaluate.format_table(report)


def test_evaluate_with_predicted_masks_refuses_in_one_line(model, predictors, tmp_path, capsys):
    root = strip_dataset(tmp_path / 'data')
    base = ['-o', model, '--dataroot', root, '--phase', 'test', '--out', tmp_path / 'out']
    with pytest.raises(SystemExit) as end:
        evaluate_json(*base, '--predicted-masks', predictors['red'])  # categories.json: skirt
    assert end.value.code == (
        f'evaluate.py: {root}/testB: the mask predictor finds skirt in 0 '
        'of 4 photos; cross-validation needs at least 2'
    )
    bare = tmp_path / 'bare'
    bare.mkdir()
    for name in ['parameters.h5', 'state.json']:
        (bare / name).write_bytes((model / name).read_bytes())
    with pytest.raises(SystemExit) as end:
        evaluate_json('-o', bare, *base[2:], '--predicted-masks', predictors['red'])
    assert end.value.code == (
        'evaluate.py: --predicted-masks: give --categories CAT_A CAT_B, the categories the '
        f'predictor finds; no categories.json beside {bare}/parameters.h5 names them'
    )
    with pytest.raises(SystemExit) as end:
        evaluate_json(*base, '--categories', 'jeans', 'skirt')
    assert end.value.code == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .endswith('error: --categories goes with --predicted-masks')
    )


def test_make_translate_translates_a_bundled_photo_alone(tmp_path, capsys):
    """What `make translate` runs last: the shipped generators and predictor on a val photo,
    which neither was trained on."""
    photo = os.path.join(ROOT, 'datasets', 'ccp_sample', 'valA', '1065.png')
    out = tmp_path / 'from_photo'
    assert (
        run('-o', os.path.join(ROOT, 'pretrained', 'jeans2skirt_64x44'), '--image', photo, '--out', out)
        is None
    )
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith('translate.py: no --masks: predicted ') and ' jeans instance(s) with ' in line
    masks = sorted(out.glob('1065_mask_pred_*.png'))
    assert masks and len(list(out.glob('1065_[0-9]*.png'))) == len(masks)
    assert np.asarray(Image.open(out / '1065_full.png')).shape == (330, 220, 3)
