"""The short version of scripts/soak.py (the long run: 10,000 cycles): adapter life cycles and
per-row batches leave no state behind and RSS stops growing after warm-up."""

import importlib.util
import os

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "soak.py")


def test_soak_short(capsys):
    spec = importlib.util.spec_from_file_location("soak", SCRIPT)
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    # few cycles: allocator noise is a larger share of a short run, hence the looser RSS bound
    rc = soak.main(["--cycles", "300", "--max-growth", "5"])
    out = capsys.readouterr().out
    print(out)
    assert rc == 0, out
    assert out.count("-> ok") == 2
