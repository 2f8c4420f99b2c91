import pytest
import torch

import lora_ext  # noqa: F401  (registers torch.ops.lora_ext)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
