"""Newer-host schema features are used where the host has them, and dropped where it does not."""

from __future__ import annotations

import inspect

from comfy_api.latest import io

from motionclone.nodes.host_features import advanced, supported
from motionclone.nodes.motion_nodes import ExtractSparseMotion, MotionGuidedSampler
from motionclone.nodes.video_nodes import LoadReferenceVideo


def test_keywords_follow_what_the_host_accepts():
    assert supported(io.Schema, node_id="x", no_such_keyword=1) == {"node_id": "x"}
    host_has_aliases = "search_aliases" in inspect.signature(io.Schema).parameters
    host_has_advanced = "advanced" in inspect.signature(io.Int.Input).parameters
    assert supported(io.Schema, search_aliases=["a"]) == ({"search_aliases": ["a"]} if host_has_aliases else {})
    assert advanced(io.Int.Input) == ({"advanced": True} if host_has_advanced else {})

    schema = ExtractSparseMotion.define_schema()  # builds on either host
    assert ("motionclone" in (getattr(schema, "search_aliases", None) or [])) == host_has_aliases
    by_id = {i.id: i for i in MotionGuidedSampler.define_schema().inputs}
    assert getattr(by_id["warmup"], "advanced", None) is (True if host_has_advanced else None)
    assert getattr(by_id["guidance_weight"], "advanced", None) is None  # the inputs users tune stay in view
    video = {i.id: i for i in LoadReferenceVideo.define_schema().inputs}
    assert getattr(video["skip_first_frames"], "advanced", None) is (True if host_has_advanced else None)
    assert getattr(video["evenly_spaced_frames"], "advanced", None) is None


def test_every_node_schema_passes_the_host_validation():
    import asyncio

    from motionclone.nodes import comfy_entrypoint

    nodes = asyncio.run(asyncio.run(comfy_entrypoint()).get_node_list())
    assert len(nodes) == 10
    for node in nodes:
        schema = node.define_schema()
        schema.finalize()
        schema.validate()  # the host's own checks (unique ids, each input's and output's validate())
