"""Built-in plugins, one module each. Select them with ``plugins=`` (see docs/plugins.md)."""
