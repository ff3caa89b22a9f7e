"""qgraph's version, in a module of its own so the artifact and export writers can stamp it without importing the
``qgraph`` package (which imports them)."""

__version__ = "0.1.0"
