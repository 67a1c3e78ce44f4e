"""Integration definitions: the plugin format, discovery, and parameter resolution."""
