"""kdtools: knowledge distillation from every kind of source, as small Unix commands.

The package is a library; ``kdtools.cli`` holds one thin command-line module per tool.
"""

__version__ = "0.1.0"
