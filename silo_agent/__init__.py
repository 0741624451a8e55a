"""The silo side: receive a plan, train locally, evaluate, embed, upload."""
