"""TailNAS search spaces, supernets, data, training and search."""

__version__ = "0.1.0"
