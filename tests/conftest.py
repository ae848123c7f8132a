import os

import pytest
import torch

# one thread: tiny-op tests slow down badly when OpenMP threads oversubscribe busy cores
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
