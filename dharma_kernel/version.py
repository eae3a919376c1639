"""Kernel version and the module API it speaks; importing this is free."""

__version__ = "0.1.0"

# Major changes break plugins; a newer minor only adds. See docs/AUTHORING.md.
MODULE_API = "1.0"
