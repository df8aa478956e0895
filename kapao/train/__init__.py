"""Training: the trainer loop and its pieces (arguments and run folders, batch update, sampler, log, optimiser,
distributed, plots)."""
