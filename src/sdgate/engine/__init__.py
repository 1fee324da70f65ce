"""The model side: load a diffusers pipeline and run it on one thread that owns it.

Nothing here is imported by the API or gateway modules unless the local backend is used, so the
gateway installs and starts without torch.
"""
