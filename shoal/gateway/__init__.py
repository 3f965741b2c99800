"""The gateway: model pools, the router that tries the small model first, the semantic cache."""
