"""The `fedmef` command-line application (installed as fedmef_toolkit.cli)."""
