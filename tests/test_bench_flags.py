"""bench.py refuses bad values of its own flags at parse time, before any benchmark runs, and
ends every other failure, Ctrl-C included, with one line."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / 'bench.py'

BAD_VALUES = {  # flag: values that must be refused
    '--config': ['0', '-1', 'x', ''],
    '--what': ['0', '-1', 'x', ''],
    '--warmup': ['-1', '0.5', 'x', ''],
    '--iters': ['0', '-1', '0.5', 'x', ''],
    '--processes': ['0', '-1', 'x', ''],
    '--json': ['0'],
}


def test_bad_values_cover_every_flag():
    result = subprocess.run(
        [sys.executable, str(BENCH), '--help'], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    flags = set(re.findall(r'(?<![\w-])--[a-zA-Z][\w-]*', result.stdout)) - {'--help'}
    assert flags == set(BAD_VALUES)


@pytest.mark.parametrize(
    'flag, value', [(flag, value) for flag, values in BAD_VALUES.items() for value in values]
)
def test_every_bad_flag_value_is_a_usage_error(tmp_path, flag, value):
    # Should the value be accepted, the missing --dataroot stops the run before any timing.
    command = [
        sys.executable,
        str(BENCH),
        f'{flag}={value}',
        '--dataroot',
        tmp_path / 'none',
        '--monitor-path',
        tmp_path / 'monitor',
        '--model-save-path',
        tmp_path / 'models',
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f'bench.py: error: argument {flag}')
    assert list(tmp_path.iterdir()) == []


def test_missing_dataset_and_missing_compiler_are_one_line(tmp_path):
    command = [
        sys.executable,
        str(BENCH),
        '--iters',
        '1',
        '--monitor-path',
        tmp_path / 'm',
        '--model-save-path',
        tmp_path / 'o',
    ]
    result = subprocess.run(
        command + ['--dataroot', tmp_path / 'none'], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f'bench.py: {tmp_path / "none"}: dataset folder not found '
        '(datasets/generate_ccp_dataset.py makes one)'
    )
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, CC=str(tmp_path / 'no-such-cc')),
    )
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith('bench.py: cannot compile cpu_engine/kernels.c')


def test_ctrl_c_is_one_line(tmp_path):
    process = subprocess.Popen(
        [
            sys.executable,
            str(BENCH),
            '--warmup',
            '0',
            '--iters',
            '1000',
            '--monitor-path',
            tmp_path / 'm',
            '--model-save-path',
            tmp_path / 'o',
        ],
        cwd=BENCH.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline().startswith('iteration 0')  # in the timed loop
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130
    assert 'Traceback' not in stderr
    assert stderr.strip().splitlines()[-1] == 'bench.py: stopped by SIGINT'
