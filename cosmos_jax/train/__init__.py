"""Training: state, optimizer, EMA teacher, the jitted step, sharding, checkpoints, multi-host."""
