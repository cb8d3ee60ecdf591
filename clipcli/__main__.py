"""`python -m clipcli` runs the `clip` command."""

from clipcli.cli import main

main()
