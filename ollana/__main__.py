"""python -m ollana: the ollana command."""

from ollana.cli import main

main()
