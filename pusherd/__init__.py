"""pusherd: a self-hosted webhook relay daemon."""

__version__ = "0.1.0"
