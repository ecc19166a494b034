"""The wire protocol shared by the router, the model server and the client: torch-free by contract.

`names` maps tiers, policies and finish reasons to and from the protobuf enums; `requests` renders
prompts and validates requests into `Sampling`; `errors` holds the one refusal type; `text` turns
token ids into safe text deltas; `servicer` registers a stratus.v1.Inference implementation.
"""
