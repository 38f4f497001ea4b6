"""The demo trains on Fashion-MNIST when a copy is on the machine and says so; otherwise on the synthetic set."""

from __future__ import annotations

import pytest

from sparsedist.data.sources import FASHION_MNIST_SYSTEM_DIR
from sparsedist.launch.demo import demo_config


def test_without_a_local_copy_the_demo_falls_back_to_synthetic_data_and_says_how_to_get_it(tmp_path):
    empty = tmp_path / "no-fashion-mnist"
    empty.mkdir()
    cfg, note = demo_config([f"data.source={empty}", f"data.root={tmp_path / 'data'}"])
    assert cfg.data.dataset == "synthetic"
    assert "synthetic" in note and "apt-get install dataset-fashion-mnist" in note
    assert cfg.controller.strategy == "adaptive" and cfg.controller.max_relax_jump == 1.0  # Strategy 2
    assert cfg.scaling.num_workers == 2 and not cfg.scaling.use_gpu


@pytest.mark.skipif(not FASHION_MNIST_SYSTEM_DIR.is_dir(), reason=f"needs Fashion-MNIST in {FASHION_MNIST_SYSTEM_DIR} "
                    "(Debian package dataset-fashion-mnist)")
def test_with_the_debian_package_the_demo_uses_fashion_mnist_offline(tmp_path):
    cfg, note = demo_config([f"data.root={tmp_path / 'data'}"])
    assert cfg.data.dataset == "fashion-mnist" and "Fashion-MNIST" in note
    assert not (tmp_path / "data" / "raw").exists()  # read from the system copy, nothing downloaded
