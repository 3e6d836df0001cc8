"""Stage 4, pretraining on Ray Train: config (the typed run spec), data (store + transforms + model sizing), driver
(TorchTrainer assembly), loop (the worker loop), checkpoint (the format's one owner), metrics, debug hooks."""
