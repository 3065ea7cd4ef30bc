"""Distribution: xdist workers and their journals, scheduling by base, shards of the matrix, interrupts."""
