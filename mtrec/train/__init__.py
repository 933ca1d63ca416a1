"""Training: sharding plan, data stream, train loop (single process here; Ray workers in mtrec.jobs)."""
