"""Media sources (sender side) and sinks (receiver side), all meeting on ``base``'s types."""
