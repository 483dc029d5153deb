"""Every flag of train.py refuses zero, negative and out-of-range values as it is parsed."""

import json
import os
import subprocess
import sys

import pytest

import args
from conftest import ROOT

# Values each validated type must refuse.
BAD_VALUES = {
    args.positive_int: ['0', '-1', '2.5', 'many'],
    args.non_negative_int: ['-1', '1.5'],
    args.seed: ['-1', str(2**31)],
    args.non_negative_float: ['-1', '-1e-9', 'nan', 'inf'],
    args.adam_beta: ['5', '1', '-0.1', 'nan'],
    args.device_id: ['-1', 'gpu'],
    args.path: [''],
}
# Parses each argv of a JSON list with args.py alone, as train.py would, without loading nnabla;
# prints [exit status, stderr] of each (status None: an exception other than SystemExit).
PARSE = f"""
import contextlib, io, json, sys, traceback
sys.argv[0] = 'train.py'
sys.path.insert(0, {ROOT!r})
from args import get_args
results = []
for argv in json.loads(sys.argv[1]):
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            get_args(argv)
        code = 0
    except SystemExit as exit:
        code = exit.code
    except BaseException:
        code, stderr = None, io.StringIO(traceback.format_exc())
    results.append([code, stderr.getvalue()])
print(json.dumps(results))
"""


def parse_all(argvs):
    result = subprocess.run(
        [sys.executable, '-c', PARSE, json.dumps(argvs)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def parse(*argv):
    return parse_all([list(argv)])[0]


def bad_cases():
    cases, switches = [], []
    for action in args.build_parser()._actions:
        if action.nargs == 0:  # takes no value
            switches.append(action.option_strings[0])
            continue
        if action.choices:
            values = ['bogus']
        else:
            assert action.type in BAD_VALUES, f'{action.option_strings[0]} has no checked type'
            values = BAD_VALUES[action.type]
        cases += [(action.option_strings[0], value) for value in values]
    assert switches == ['-h', '--no-flip', '--resume', '--overwrite']
    return cases


def test_every_flag_refuses_bad_values_in_one_line():
    cases = bad_cases()
    results = parse_all([list(case) for case in cases])
    for (flag, value), (code, stderr) in zip(cases, results):
        assert code == 2, (flag, value, stderr)
        assert 'Traceback' not in stderr, (flag, value, stderr)
        last = stderr.strip().splitlines()[-1]
        assert last.startswith('train.py: error: argument ' + flag), (flag, value, last)


def test_defaults_and_good_values_parse():
    assert parse()[0] == 0
    code, stderr = parse(
        '--batch-size',
        '2',
        '--n-blocks',
        '0',
        '--lambda-idt',
        '0',
        '--beta1',
        '0',
        '--seed',
        str(2**31 - 1),
        '--device-id',
        '1',
    )
    assert code == 0, stderr


@pytest.mark.parametrize(
    'argv, message',
    [
        (
            ['--max-epoch', '3', '--lr-decay-start-epoch', '4'],
            '--lr-decay-start-epoch 4 is beyond --max-epoch 3',
        ),
        (
            ['--fineSizeH', '30'],
            '--fineSizeH 30 --fineSizeW 200: a network height of 30 is not a '
            'multiple of 4 of at least 24 (--n-layers-D 3)',
        ),
        (
            ['--fineSizeW', '8', '--n-layers-D', '2'],
            '--fineSizeH 300 --fineSizeW 8: a network '
            'width of 8 is not a multiple of 4 of at least '
            '12 (--n-layers-D 2)',
        ),
        (['--fineSizeH', '400'], 'fine size 400x200 is larger than load size 330x220'),
        (['--resume', '--overwrite'], 'argument --overwrite: not allowed with argument --resume'),
    ],
)
def test_flags_that_contradict_each_other(argv, message):
    code, stderr = parse(*argv)
    assert code == 2 and stderr.strip().splitlines()[-1] == 'train.py: error: ' + message


def test_the_decay_starts_after_two_thirds_of_the_epochs_unless_given():
    """The official recipe decays over the last third (400 of 600 epochs), so that
    --max-epoch alone makes a consistent schedule."""
    assert args.get_args([]).lr_decay_start_epoch == 400
    assert args.get_args(['--max-epoch', '3']).lr_decay_start_epoch == 2
    assert args.get_args(['--max-epoch', '3', '--lr-decay-start-epoch', '0']).lr_decay_start_epoch == 0


def test_nnabla_examples_spellings():
    """-c cuda and --learning-rate_G/_D, as nnabla-examples' READMEs write them."""
    parsed = args.get_args(['-c', 'cuda', '--learning-rate_G', '1e-3', '--learning-rate_D', '3e-4'])
    assert parsed.context == 'cudnn'
    assert (parsed.learning_rate_G, parsed.learning_rate_D) == (1e-3, 3e-4)
    assert args.get_args(['-t', 'float']).type_config == 'float'
    assert parse('-t', 'half')[0] == 2  # nothing scales the loss, so no half precision


def test_train_py_refuses_before_loading_anything(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, 'train.py'),
            '--batch-size',
            '0',
            '--model-save-path',
            str(tmp_path / 'models'),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "train.py: error: argument --batch-size/-b: '0' is not a positive integer"
    )
    assert not (tmp_path / 'models').exists()
