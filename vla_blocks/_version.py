"""The package version (its own module, so submodules read it without importing the package)."""

__version__ = "0.1.0"
