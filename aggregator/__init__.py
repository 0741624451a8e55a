"""The coordinator side: collect uploads, aggregate, assign experts, publish plans."""
