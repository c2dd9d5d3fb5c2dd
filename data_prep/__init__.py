"""Dataset preparation jobs (installed as ``g3dr.data_prep``): ImageNet + pseudo-depth into WebDataset shards."""
