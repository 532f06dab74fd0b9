"""vngtasks: run CI workloads inside a virtme-ng VM on exactly the kernel you name."""

__version__ = "0.1.0"
