"""Speed, memory and FLOP benchmarks of the scBERT family and its peers: `python benchmarks/run.py`."""
