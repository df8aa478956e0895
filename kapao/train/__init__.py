"""Training: the trainer loop and its pieces (arguments and run folders, step, sampler, log, optimiser, distributed, plots)."""
