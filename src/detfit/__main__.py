"""``python -m detfit`` (and ``torchrun ... -m detfit train``): the console entry point."""

from detfit.cli import main

main()
