"""Shared fixtures: real data from ../shared/data, and the `slow` marker (skipped unless --runslow)."""

from pathlib import Path

import anndata as ad
import pytest

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BARON_PATH = DATA_DIR / "celltype" / "baron_mouse_pancreas.h5ad"
CLASSIFIER_CLASSES = ("alpha", "beta", "ductal")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes-long test (full-size models); run with --runslow")
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped on CPU machines")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow test: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def baron():
    """Baron et al. 2016 mouse pancreas: 1,886 cells x 14,877 genes, raw UMI counts, obs['cell_type1']."""
    if not BARON_PATH.exists():
        pytest.skip(f"real data not found at {BARON_PATH} (the project's shared/data folder)")
    return ad.read_h5ad(BARON_PATH)


@pytest.fixture(scope="session")
def baron_small(baron):
    """200 Baron cells, every cell type kept, as an in-memory copy."""
    import numpy as np

    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(baron.n_obs, size=200, replace=False))
    return baron[rows].copy()


@pytest.fixture(scope="session")
def pbmc():
    """scanpy's pbmc68k_reduced (Zheng68K subset, 700 x 765): .raw.X is log-normalised, .X is z-scored."""
    import scanpy as sc

    return sc.datasets.pbmc68k_reduced()


@pytest.fixture
def fresh_accelerate_state():
    """AcceleratorState/GradientState are singletons: a second in-process run with other settings would fail."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def classifier_cells(baron) -> ad.AnnData:
    """40 Baron cells of each of 3 types on the 300 most often detected genes, raw counts."""
    import numpy as np
    import scipy.sparse as sp

    detected = np.asarray((sp.csr_matrix(baron.X) > 0).sum(axis=0)).ravel()
    genes = np.sort(np.argsort(-detected, kind="stable")[:300])
    labels = baron.obs["cell_type1"].astype(str).to_numpy()
    rng = np.random.default_rng(1)
    rows = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == name), 40, replace=False)
                                   for name in CLASSIFIER_CLASSES]))
    subset = baron[rows][:, genes].copy()
    subset.obs = subset.obs[["cell_type1"]].astype(str)
    subset.X = sp.csr_matrix(subset.X, dtype=np.float32)
    return subset


@pytest.fixture(scope="session")
def tiny_classifier(classifier_cells, tmp_path_factory) -> Path:
    """scbert2-tiny fine-tuned for 30 steps on `classifier_cells`: a real classifier folder with a novelty detector."""
    import torch
    from accelerate.state import AcceleratorState, GradientState

    from train import finetune

    folder = tmp_path_factory.mktemp("annotator")
    classifier_cells.write_h5ad(folder / "labelled.h5ad")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        finetune.main(["--data", str(folder / "labelled.h5ad"), "--label_key", "cell_type1", "--architecture",
                       "scbert2-tiny", "--max_length", "64", "--max_steps", "30", "--per_device_batch_size", "16",
                       "--output_dir", str(folder / "run"), "--cache_dir", str(folder / "cache"), "--no_baseline",
                       "--num_workers", "0", "--no_progress_bar", "--highly_variable_genes", "100"])
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return folder / "run" / "model"


@pytest.fixture
def remote_code_predictions(tmp_path):
    """Runs a saved folder as remote code in a fresh interpreter without this package (`python -I`, ``auto_class``
    with trust_remote_code) on the given inputs; returns its class name and its output ``output``."""
    import subprocess
    import sys

    import numpy as np
    from safetensors.torch import save_file

    def run(folder, inputs: dict, auto_class: str = "AutoModel", output: str = "predictions") -> tuple[str, np.ndarray]:
        save_file({k: v.contiguous() for k, v in inputs.items()}, tmp_path / "inputs.safetensors")
        code = (f"import sys, numpy, torch; from safetensors.torch import load_file; "
                f"from transformers import {auto_class} as A; m = A.from_pretrained(sys.argv[1], trust_remote_code=True)"
                f".eval(); print(type(m).__module__ + '.' + type(m).__name__); "
                f"numpy.save(sys.argv[3], m(**load_file(sys.argv[2])).{output}.detach().numpy())")
        out = subprocess.run([sys.executable, "-I", "-c", code, str(folder), str(tmp_path / "inputs.safetensors"),
                              str(tmp_path / "out.npy")], cwd=tmp_path, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.strip().splitlines()[-1], np.load(tmp_path / "out.npy")

    return run
