"""Stage 5, inference: embeddings of every cell of a store from a checkpoint (embed.py), and their evaluation."""
