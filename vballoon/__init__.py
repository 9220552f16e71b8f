"""vballoon: the device process (command line, transports wiring, benchmarks)."""
