"""hsr.attention."""
