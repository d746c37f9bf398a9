from pathlib import Path

from setuptools import setup

setup(
    name="scbert-hf",
    version="0.1.0",
    description="Hugging Face-native scBERT family: single-cell foundation models for cell type annotation and more",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["modeling_scbert", "tokenization", "train"],
    package_data={"tokenization": ["gene_tables/*.csv.gz", "gene_tables/README.md"]},
    install_requires=[
        "torch>=2.4",
        # 5.4 made PreTrainedConfig a dataclass, which the configs' `@strict` fields and validators build on.
        "transformers>=5.4,<6",
        "accelerate>=1.0",
        "datasets>=3.0",
        "safetensors>=0.4",
        "huggingface_hub>=1.0",
        "anndata>=0.10",
        "scanpy>=1.10",
        "scikit-learn>=1.3",
        "numpy>=1.26",
        "scipy>=1.11",
        "pandas>=2.0",
    ],
    extras_require={
        "flash": ["flash-attn>=2.6"],
        "gpu": ["bitsandbytes>=0.43"],
        # performer-pytorch 1.0.6 (the code scBERT vendors) is installed with --no-deps by .ci/setup_env: its
        # declared pytorch-fast-transformers dependency does not build. These are the pieces it really imports.
        "dev": ["pytest>=8", "einops>=0.7", "axial-positional-embedding>=0.2", "local-attention==1.4.4"],
        # The drug-synergy task (train/synergy.py): Morgan fingerprints of the drugs' SMILES.
        "synergy": ["rdkit>=2023.9"],
        # What benchmarks/ compares against: CellTypist (celltypist_cv.py), the int8 backends (int8_options.py).
        "bench": ["celltypist>=1.6", "torchao>=0.12", "onnxruntime>=1.20", "onnx>=1.17", "onnxscript>=0.3"],
    },
    entry_points={"console_scripts": ["scbert = train.cli:main"]},
)
