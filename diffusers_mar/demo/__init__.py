"""The Gradio demo of `diffusers-mar demo` (docs/demo.md): generate with a live image, inpaint, compare the exact
settings with a preset, read the model card, for any pipeline family with an adapter.

Modules: `families` (one `FamilyAdapter` per pipeline family, `register_family`), `frames` (live frames from the
callback's tensors), `inputs` (checks of what a person types or uploads), `commands` (the equivalent Python and
command line), `runner` (a pipeline call in a thread, cancellable), `model` (loading through the command line's code),
`actions` (what the buttons do), `quality` (figures quoted from docs/benchmarks.md), `security` (the server's
settings) and `app` (the Gradio interface; the only module that imports gradio, when it builds the interface).
"""

from diffusers_mar.demo.families import FAMILIES, FamilyAdapter, family_for, register_family
from diffusers_mar.demo.frames import DecodedFrames, TokenFrames

__all__ = ["FAMILIES", "DecodedFrames", "FamilyAdapter", "TokenFrames", "family_for", "register_family"]
