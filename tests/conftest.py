import os
import sys

import nnabla as nn
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def fresh_parameters():
    """Each test builds its networks from an empty parameter store."""
    nn.clear_parameters()
    yield
    nn.clear_parameters()
