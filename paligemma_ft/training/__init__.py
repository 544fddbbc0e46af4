"""Training: the loop, the step, optimizers, losses and the run's report."""
