"""Each example trains a few steps on small sizes, stock torch against lossforge from the same seed:
their loss curves agree, and the CSV and the plot are written."""
import importlib
import os

import pytest

from tests.conftest import device_for

EXAMPLES = {
    "imbalanced_focal": ["--batch", "96", "--classes", "37", "--dim", "16"],
    "clip_dual_encoder": ["--batch", "48", "--latent", "8", "--dim", "16", "--emb", "16"],
    "metric_learning_triplet": ["--batch", "48", "--identities", "50", "--dim", "16", "--emb", "8"],
    "causal_lm": ["--batch", "2", "--seq", "16", "--vocab", "97", "--hidden", "32", "--layers", "1"],
}


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_runs_and_its_curves_agree(kernel_backend, name, tmp_path):
    if name == "causal_lm":
        pytest.importorskip("transformers")
    example = importlib.import_module(f"examples.{name}")
    argv = ["--steps", "3", "--device", device_for(kernel_backend), "--backend", kernel_backend,
            "--out", str(tmp_path), *EXAMPLES[name]]
    runs = example.main(argv)
    assert [r["name"] for r in runs][1] == "lossforge"
    assert all(len(r["losses"]) == 3 for r in runs)
    assert len(set(runs[0]["losses"])) > 1  # the model trains: the loss moves
    common = importlib.import_module("examples._common")
    assert common.max_gap(runs) < 1e-4, [r["losses"] for r in runs]
    with open(tmp_path / f"{name}.csv") as f:
        assert len(f.read().splitlines()) == 1 + 2 * 3
    assert os.path.exists(tmp_path / f"{name}.png")
