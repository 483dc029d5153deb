"""bench.py refuses bad values of its own flags at parse time, before any benchmark runs."""
import re
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
    '--json': ['0'],
}


def test_bad_values_cover_every_flag():
    result = subprocess.run([sys.executable, str(BENCH), '--help'], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    flags = set(re.findall(r'(?<![\w-])--[a-zA-Z][\w-]*', result.stdout)) - {'--help'}
    assert flags == set(BAD_VALUES)


@pytest.mark.parametrize('flag, value', [(flag, value) for flag, values in BAD_VALUES.items()
                                         for value in values])
def test_every_bad_flag_value_is_a_usage_error(tmp_path, flag, value):
    # Should the value be accepted, the missing --dataroot stops the run before any timing.
    command = [sys.executable, str(BENCH), f'{flag}={value}', '--dataroot', tmp_path / 'none',
               '--monitor-path', tmp_path / 'monitor', '--model-save-path', tmp_path / 'models']
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f'bench.py: error: argument {flag}')
    assert list(tmp_path.iterdir()) == []
