"""A world generator checkpoint as an MLflow pyfunc model (MLflow "models from code": this file is the model).

    model = mlflow.pyfunc.load_model("models:/clvr-world-generator@champion")
    pngs = model.predict(["a photo of a red circle", "two blue squares"])  # base64-encoded PNG per prompt

Strings in, strings out, so `mlflow models serve` answers JSON. Image i is sampled with seed i, at the
checkpoint's own default steps and guidance.
"""

import base64
import io

import mlflow
from mlflow.pyfunc import PythonModel


class WorldGeneratorModel(PythonModel):
    def load_context(self, context):
        import clvr.models  # noqa: F401  (registers the "world" generator backend)
        from clvr.generator import make_generator

        self.generator = make_generator("world", model=context.artifacts["pipeline"])

    def predict(self, model_input: list[str], params=None) -> list[str]:
        from PIL import Image

        from clvr.generator import GenRequest

        out = []
        for r in self.generator.generate_batch([GenRequest(p, seed=i) for i, p in enumerate(model_input)]):
            buf = io.BytesIO()
            Image.fromarray(r.image).save(buf, format="PNG")
            out.append(base64.b64encode(buf.getvalue()).decode())
        return out


mlflow.models.set_model(WorldGeneratorModel())
