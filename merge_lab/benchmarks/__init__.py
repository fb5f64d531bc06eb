"""`merge-lab bench`: full-size random checkpoints, the I/O floor and the sd-mecha comparison."""
