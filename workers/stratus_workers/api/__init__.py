"""Generated wire types for stratus.v1 (from protos/; regenerate with `make protos`)."""
