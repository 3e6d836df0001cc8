"""Stage 1, the store: the on-disk format (format.py), ingest of h5ad/zarr inputs into it (sources.py, ingest.py,
with the seeded shuffle of permutation.py and the row gathers of csr.py), and `cellray verify` (verify.py)."""
