"""The command line: thin Typer commands (`*_commands`), the rich rendering they share (`render`), `main`."""
