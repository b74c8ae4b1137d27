"""The search loop: the driver, the optimizer, racing, the scheduler and the workers."""
