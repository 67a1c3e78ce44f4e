"""Targets (where scripts run) and the executor that changes them."""
