"""Generate, render and validate the bash scripts workflow-agent runs on targets."""
