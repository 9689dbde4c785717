"""Motion transfer on DiT video models (first Wan 2.1 as ComfyUI runs it natively).

`amf`: the attention motion flow (AMF) of one block's 3D self-attention, streamed per frame pair, and
its loss (plain torch). `wan_capture`: q, k of a Wan block in ComfyUI, on hosts with and without Wan
attn1 patches. `wan_tiny`: a tiny random-weight native Wan model for tests. Method notes: the
project's shared `docs/dit-motion-transfer-method.md`.
"""
