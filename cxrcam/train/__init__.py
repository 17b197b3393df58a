"""Training loops (classifier; detector) and their distributed helpers."""
