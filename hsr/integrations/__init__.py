"""hsr.integrations."""
