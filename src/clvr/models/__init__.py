"""The world's generator models (tiny FLUX.2-style pipeline). Importing registers the `world` generator backend."""

from clvr.models.backend import WorldGenerator, load_pipeline, world_generator  # noqa: F401  (registers "world")
from clvr.models.pipeline import WorldPipeline  # noqa: F401
