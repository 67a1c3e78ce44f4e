"""The agents: each answers a few bus topics; the coordinator drives a workflow."""
