"""Training for the scBERT family: the `scbert` command (`cli`), its scripts (`pretrain`, `finetune`, the end-to-end
`main` job) and what they share: `data` (tokenized-dataset cache, sampler, collators), `genes` (highly variable genes,
SVD gene-table initialisation), `models` (architectures and folders), `loop` (the one Accelerate loop) and `metrics`."""
