"""Reaching hosts: the Connection seam (SSH through fabric, local, recorded) with privilege escalation, and
the fan-out that gives every host one outcome within its deadline. The only layer that talks to a host."""
