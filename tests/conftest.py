import os
import tempfile

# A fresh inductor cache per test session: a cache from an earlier build of the
# extension can hold graphs calling an older schema of an internal op.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="lora_ext_inductor_")

import pytest  # noqa: E402
import torch  # noqa: E402

import lora_ext  # noqa: F401  (registers torch.ops.lora_ext)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
