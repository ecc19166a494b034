"""Handler bodies, one module per `handle_<verb>_<thing>`; main.py registers them with kopf."""
