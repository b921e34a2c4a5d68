"""The recipe: its typed schema (`schema`), reading and overrides (`load`), writing (`toml`)."""
