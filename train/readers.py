"""Reading a user's cells from the common single-cell files into an AnnData (cells x genes), with anndata's and
scanpy's readers:

- ``.h5ad``: read backed (the matrix stays on disk and is streamed in chunks);
- 10x Genomics HDF5 (``filtered_feature_bc_matrix.h5``) and 10x folders (``matrix.mtx[.gz]``, ``features.tsv[.gz]``
  or ``genes.tsv``, ``barcodes.tsv[.gz]``): gene symbols as names, repeated symbols made unique;
- ``.csv`` / ``.tsv`` / ``.txt`` (gzipped or not): one row and one column of names; genes in columns unless the
  row names match the vocabulary better (or ``genes_in_rows``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from train.data import read_h5ad

TEXT_SUFFIXES = {".csv": ",", ".tsv": "\t", ".txt": "\t"}
SUPPORTED = (".h5ad; a 10x HDF5 .h5; a 10x folder (matrix.mtx[.gz], features.tsv[.gz] or genes.tsv, "
             "barcodes.tsv[.gz]); .csv, .tsv or .txt of counts, gzipped or not")


def file_kind(path: Path) -> str:
    if path.is_dir():
        if not any((path / name).exists() for name in ("matrix.mtx", "matrix.mtx.gz")):
            raise ValueError(f"{path} is a folder without matrix.mtx or matrix.mtx.gz: a 10x folder is expected. "
                             f"Supported inputs: {SUPPORTED}.")
        return "10x_mtx"
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    suffix = suffixes[-1] if suffixes else ""
    if suffix in (".h5ad", ".h5") or suffix in TEXT_SUFFIXES:
        return suffix[1:]
    raise ValueError(f"{path} is not a supported file (suffix {''.join(path.suffixes) or 'none'}). Supported inputs: "
                     f"{SUPPORTED}.")


def read_cells(path: str | os.PathLike, vocabulary_matches=None, genes_in_rows: bool | None = None):
    """The cells of ``path`` as an AnnData (backed for ``.h5ad``). ``vocabulary_matches(names) -> int`` decides a
    text table's orientation when ``genes_in_rows`` is None."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    kind = file_kind(path)
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes). Supported inputs: {SUPPORTED}.")
    if kind == "h5ad":
        return read_h5ad(path, backed=True)
    if kind in ("h5", "10x_mtx"):
        return read_10x(path, kind)
    return read_text_table(path, TEXT_SUFFIXES["." + kind], vocabulary_matches, genes_in_rows)


def read_10x(path: Path, kind: str):
    import scanpy as sc

    try:
        adata = sc.read_10x_h5(path) if kind == "h5" else sc.read_10x_mtx(path)
    except Exception as error:  # h5py / scipy.io / pandas raise many types for a file that is not 10x output
        what = "a 10x Genomics HDF5 file (Cell Ranger's filtered_feature_bc_matrix.h5)" if kind == "h5" else \
            "a 10x folder (matrix.mtx, features.tsv or genes.tsv, barcodes.tsv)"
        raise ValueError(f"Could not read {path} as {what} ({type(error).__name__}: {error}).") from error
    adata.var_names_make_unique()
    return adata


def read_text_table(path: Path, separator: str, vocabulary_matches, genes_in_rows: bool | None):
    import anndata
    import pandas as pd

    try:
        table = pd.read_csv(path, sep=separator, index_col=0)
    except pd.errors.EmptyDataError as error:
        raise ValueError(f"{path} holds no table (empty once decompressed).") from error
    except (UnicodeDecodeError, pd.errors.ParserError, OSError, EOFError) as error:
        raise ValueError(f"Could not read {path} as a {'comma' if separator == ',' else 'tab'}-separated table "
                         f"({type(error).__name__}: {error}).") from error
    if table.shape[0] == 0 or table.shape[1] == 0:
        raise ValueError(f"{path} holds no values (a table of {table.shape[0]} rows x {table.shape[1]} columns "
                         "after the row and column names).")
    check_numeric(table, path)
    if genes_in_rows is None:
        genes_in_rows = vocabulary_matches is not None and \
            vocabulary_matches(table.index.astype(str).tolist()) > vocabulary_matches(table.columns.astype(str).tolist())
    if genes_in_rows:
        table = table.T
    matrix = sp.csr_matrix(table.to_numpy(dtype=np.float32))
    return anndata.AnnData(X=matrix, obs=pd.DataFrame(index=table.index.astype(str)),
                           var=pd.DataFrame(index=table.columns.astype(str)))


def check_numeric(table, path: Path) -> None:
    """Every value must be a number (an empty field reads as NaN, which the tokenizer reports)."""
    import pandas as pd

    for column in table.columns:
        if pd.api.types.is_numeric_dtype(table[column]):
            continue
        values = table[column]
        bad = values[pd.to_numeric(values, errors="coerce").isna() & values.notna()]
        raise ValueError(f"{path} holds non-numeric values: column {column!r}, row {bad.index[0]!r} is "
                         f"{bad.iloc[0]!r}. Expected counts (or log-normalised values) with one header row of names "
                         "and one first column of names.")
