"""Training the scales: the cache of PCA scores, the scales apart from the model, one step, the LR range test,
checkpoints and the training loop."""
