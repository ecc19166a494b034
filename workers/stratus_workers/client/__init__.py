"""Client library for edge devices and apps: the stratus.v1 Inference service, sync and async."""

from stratus_workers.client.client import AsyncClient, Client, build_request

__all__ = ["AsyncClient", "Client", "build_request"]
