"""Privacy: keys, envelope crypto and differential privacy (completed by the privacy issue)."""
