"""Output pairings: how a teacher's output meets a student head's output for an output loss."""
