"""``python -m liquidcrypto`` runs the command-line tool."""

from liquidcrypto.cli import app

app(prog_name="liquidcrypto")
