"""The router: the gRPC (and OpenAI-style HTTP) front door that picks a tier for each request."""
