"""Results on disk: the recorder behind ``lora_bench``, the store, the run log, provenance, baselines and shards."""
