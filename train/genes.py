"""Gene-level choices made from the training cells: which genes a cell's tokens come from (highly variable genes)
and where the gene vectors start (a truncated SVD of the cells' expression: scBERT 2.0's gene table, scBERT v1's
positional one)."""

from __future__ import annotations

import argparse

import numpy as np

from tokenization import GeneExpressionTokenizer


def dataset_matrix(dataset, tokenizer: GeneExpressionTokenizer):
    """Cells x vocabulary-genes CSR matrix rebuilt from the Arrow list columns (offsets reused, no per-cell loop)."""
    import scipy.sparse as sp

    table = dataset.with_format("arrow")[:]
    genes, values = table.column("gene_ids").combine_chunks(), table.column("values").combine_chunks()
    offsets = np.asarray(genes.offsets) - genes.offsets[0].as_py()
    indices = np.asarray(genes.flatten()) - tokenizer.num_special_tokens
    data = np.asarray(values.flatten(), dtype=np.float32)
    return sp.csr_matrix((data, indices, offsets), shape=(len(dataset), tokenizer.num_genes))


def highly_variable_genes(matrix, tokenizer: GeneExpressionTokenizer, n_top_genes: int) -> list[str]:
    """Vocabulary genes among the ``n_top_genes`` most variable of a cells x genes matrix of log2 values by scanpy's
    Seurat or Cell Ranger dispersion flavour. Both rank dispersion within bins of mean expression, which drops some
    of the strongest markers from the top bin: on Baron pancreas Seurat's drops Gcg, Ppy and Cd3e, Cell Ranger's
    Ins1 and Ins2; the union keeps them all."""
    import anndata
    import scanpy as sc

    if n_top_genes < 1:
        raise ValueError(f"n_top_genes must be >= 1, got {n_top_genes}.")
    expressed = np.flatnonzero(np.asarray((matrix != 0).sum(axis=0)).ravel())
    if n_top_genes >= len(expressed):
        return [tokenizer.genes[i] for i in expressed]
    cells = anndata.AnnData(matrix[:, expressed] * np.float32(np.log(2)))  # scanpy expects natural-log values
    chosen = np.zeros(len(expressed), dtype=bool)
    for flavor in ("seurat", "cell_ranger"):
        sc.pp.highly_variable_genes(cells, n_top_genes=n_top_genes, flavor=flavor)
        chosen |= cells.var["highly_variable"].to_numpy()
    return [tokenizer.genes[i] for i in expressed[chosen]]


MIN_CELLS_PER_NEW_GENE = 3  # as the corpus's QC keeps genes (train/corpus.py)


def add_data_genes(tokenizer: GeneExpressionTokenizer, adata, gene_key: str | None = None) -> int:
    """``--add_data_genes``: the data's genes that a pretrained vocabulary does not match (mouse genes without a
    one-to-one human ortholog, genes the corpus never expressed), expressed in at least ``MIN_CELLS_PER_NEW_GENE``
    cells, appended to the vocabulary; how many were added. Their vectors come from the data's SVD, as every gene's
    does from scratch."""
    if tokenizer.mode != "scbert2":
        raise ValueError("--add_data_genes grows scBERT 2.0's gene table; scBERT v1 reads the fixed panel of its "
                         "positional table. Drop the flag or fine-tune a scBERT 2.0 model.")
    names = np.asarray(GeneExpressionTokenizer._gene_names(adata, gene_key))
    cells_expressing = np.asarray((adata.X != 0).sum(axis=0)).ravel()
    return tokenizer.add_genes(names[cells_expressing >= MIN_CELLS_PER_NEW_GENE])


def select_highly_variable_genes(tokenizer: GeneExpressionTokenizer, dataset, args: argparse.Namespace) -> None:
    """Applies ``--highly_variable_genes`` to a scBERT 2.0 tokenizer (scBERT v1 reads the full gene panel)."""
    if args.highly_variable_genes and tokenizer.mode == "scbert2":
        tokenizer.selected_genes = highly_variable_genes(dataset_matrix(dataset, tokenizer), tokenizer,
                                                         args.highly_variable_genes)


def svd_gene_embeddings(matrix, hidden_size: int, std: float, seed: int, whiten: bool = False,
                        scale_genes: bool = False, cell_weights: np.ndarray | None = None) -> np.ndarray:
    """Gene vectors from a truncated SVD of the cells' log-normalised expression, scaled to ``std``.

    Genes that co-vary across cells start close together, which a randomly initialised table of ~15k genes cannot
    learn from a few thousand cells in a few epochs. Uses only the cells given (no labels). ``whiten`` gives every
    component the same scale instead of weighting it by its singular value, so that small programmes (a rare cell
    type's) are not drowned out by the large ones. ``scale_genes`` first brings every gene to the same root mean
    square (as PCA scales genes): a gene's vector is then at most as long as any other's, where unscaled the few
    genes highly expressed in many cells (on the pretraining corpus, a 299-gene targeted panel's) dwarf the rest.
    ``cell_weights`` (one per cell, e.g. the pretraining draws' file balance) weight the cells as a sample drawn
    with those weights would.
    """
    import scipy.sparse as sp
    from sklearn.decomposition import TruncatedSVD

    matrix = sp.csr_matrix(matrix, dtype=np.float32)
    if cell_weights is not None:
        weights = np.asarray(cell_weights, dtype=np.float64)
        matrix = sp.diags(np.sqrt(weights / weights.mean()).astype(np.float32)) @ matrix
    if scale_genes:
        rms = np.sqrt(np.asarray(matrix.multiply(matrix).mean(axis=0)).ravel())
        matrix = matrix @ sp.diags(np.divide(1.0, rms, out=np.zeros_like(rms), where=rms > 0).astype(np.float32))
    components = min(hidden_size, min(matrix.shape) - 1)
    svd = TruncatedSVD(n_components=components, random_state=seed).fit(matrix)
    vectors = np.zeros((matrix.shape[1], hidden_size), dtype=np.float32)
    vectors[:, :components] = svd.components_.T * (1.0 if whiten else svd.singular_values_)
    return vectors * (std / vectors.std())


def align_gene_embeddings(vectors: np.ndarray, reference: np.ndarray, genes: np.ndarray) -> np.ndarray:
    """``vectors`` (genes x width) turned by the rotation (orthogonal Procrustes) that brings the rows ``genes`` closest
    to the same rows of ``reference``: an SVD table's axes are arbitrary (any rotation of it is as good), while
    pretrained layers expect the axes of the table they were trained with. Distances between genes are unchanged."""
    from scipy.linalg import orthogonal_procrustes

    if genes.size < vectors.shape[1]:
        raise ValueError(f"Aligning the gene table needs at least as many shared genes as its width ({vectors.shape[1]}); "
                         f"the cells express {genes.size} genes of the vocabulary.")
    rotation, _ = orthogonal_procrustes(vectors[genes], reference[genes])
    return (vectors @ rotation).astype(np.float32)


def initialise_gene_embeddings(model, dataset, tokenizer: GeneExpressionTokenizer, args: argparse.Namespace,
                               align: bool = False, cell_weights: np.ndarray | None = None,
                               pretrained_genes: int | None = None) -> None:
    """Applies ``--gene_embedding_init svd`` / ``svd_whitened`` / ``svd_scaled`` to a model: scBERT 2.0's gene table,
    or scBERT v1's frozen positional table, where scBERT has gene2vec (itself an embedding of gene co-expression).
    Without it v1 cannot tell its genes apart, and from scratch it learns only the class prior. With ``align`` (a
    pretrained scBERT 2.0), the SVD table is first rotated onto the model's own table over the genes the cells
    express, among its first ``pretrained_genes`` (those the pretrained table holds; default all: a vocabulary grown by
    ``add_data_genes`` has new rows with nothing to align to). ``cell_weights``: see ``svd_gene_embeddings``."""
    if not args.gene_embedding_init.startswith("svd"):
        return
    if model.config.model_type == "scbert" and not model.config.use_gene2vec:
        return
    matrix = dataset_matrix(dataset, tokenizer)
    vectors = svd_gene_embeddings(matrix, model.config.hidden_size, args.gene_embedding_std, args.seed,
                                  whiten=args.gene_embedding_init == "svd_whitened",
                                  scale_genes=args.gene_embedding_init == "svd_scaled", cell_weights=cell_weights)
    if align:
        table = model.get_input_embeddings().weight.detach().float().cpu().numpy()
        expressed = np.flatnonzero(matrix.getnnz(axis=0) > 0)
        expressed = expressed[expressed < (pretrained_genes or tokenizer.num_genes)]
        vectors = align_gene_embeddings(vectors, table[-vectors.shape[0]:], expressed)
    if model.config.model_type == "scbert2":
        model.load_gene_embeddings(vectors)
    else:
        model.load_gene2vec(vectors)
