"""Stage 3, loading: sampler.py plans each epoch's reads, chunks.py decodes store chunks directly, readers.py runs
those reads (and the transforms) in threads or Ray actors, loader.py turns them into one rank's torch batches."""
