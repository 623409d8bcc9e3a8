"""What a host is: the probe that reads every fact of a host in one round trip, and the pure parsers of its
sections (software, GPUs, GPU memory and health), tested on recorded real output."""
