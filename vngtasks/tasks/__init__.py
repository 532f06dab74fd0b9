"""Invoke tasks: thin wrappers that read settings and call the plain modules."""
