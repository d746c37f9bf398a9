"""Training scripts of the scBERT family (pretrain, finetune, the end-to-end main job)."""
