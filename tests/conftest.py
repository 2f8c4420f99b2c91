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


# Property-based tests (test_properties_*.py): one reproducible profile for CI. Each test sets its
# own max_examples through strategies.examples(n); LORA_EXT_HYPOTHESIS_EXAMPLES multiplies them
# (e.g. LORA_EXT_HYPOTHESIS_EXAMPLES=20 for a long run).
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # only the property tests need it
    pass
else:
    settings.register_profile(
        "lora_ext",
        deadline=None,
        derandomize=True,  # the same examples on every run and machine
        database=None,  # nothing written into the repository; failures print their reproduction
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.load_profile("lora_ext")
