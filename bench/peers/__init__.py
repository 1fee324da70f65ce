"""Peers: the same model served the ways people serve it today, each kept minimal and as documented.

- :mod:`bench.peers.plain`: the pattern most tutorials show, a FastAPI route that calls the
  diffusers pipeline under a lock and answers with the JPEG.
- :mod:`bench.peers.litserve_server`: LitServe with its dynamic batching on.

They take the same JSON body as sdgate's ``POST /v1/generations`` (``prompt``, ``width``,
``height``, ``num_inference_steps``, ``guidance_scale``, ``seed``), load the same pipeline
directory with diffusers' ``from_pretrained``, and encode a JPEG at quality 90, as sdgate does.
"""
