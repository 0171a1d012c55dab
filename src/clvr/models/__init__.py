"""The generator models: the world's (tiny FLUX.2-style pipeline) and FLUX.2 [klein]. Importing registers the
`world` and `klein` generator backends."""

from clvr.models.backend import WorldGenerator, load_pipeline, world_generator  # noqa: F401  (registers "world")
from clvr.models.pipeline import WorldPipeline  # noqa: F401
from clvr.models import klein  # noqa: F401,E402  (registers "klein"; diffusers' klein classes load lazily)
