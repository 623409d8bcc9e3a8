"""Applying a stack to one host: its state read once (Target, HostState), steps planned as actions, the one
executor that runs them, and what the steps ship (images, wheelhouse, the carried uv)."""
