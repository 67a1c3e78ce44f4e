"""workflow-agent: install, verify and uninstall monitoring integrations on real systems."""

__version__ = "0.1.0"
