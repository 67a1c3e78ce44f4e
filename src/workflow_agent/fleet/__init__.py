"""Fleets: many hosts at once. ``inventory`` reads Ansible-compatible inventories."""
