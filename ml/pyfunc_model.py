"""The MLflow pyfunc model of the text classifier, logged as a model from code (no pickle).

MLflow stores this file with the model and runs it when the model is loaded; the weights come
from the ``export`` artifact (safetensors + tokenizer + label map) and inference is
:class:`ml.predict.TextClassifier`. ``ml.registry.log_model`` logs it.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

TEXT_COLUMN = "text"


class TextClassifierModel(PythonModel):
    """Input: a DataFrame with a ``text`` column, or a list of strings; output: ``label``, ``score``.

    Params: ``batch_size`` (default 32).
    """

    def load_context(self, context) -> None:
        # imported here so that logging the model (which runs this file) needs no torch import
        from ml.predict import TextClassifier

        self.classifier = TextClassifier.from_dir(context.artifacts["export"])

    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        batch_size = int((params or {}).get("batch_size", 32))
        predictions = self.classifier.predict(_texts(model_input), batch_size=batch_size)
        return pd.DataFrame(predictions, columns=["label", "score"])


def _texts(model_input: Any) -> list[str]:
    if isinstance(model_input, pd.DataFrame):
        # The signature's input is one unnamed string column, so MLflow hands a list of strings
        # over as a one-column frame (column 0); a frame with a `text` column keeps its name.
        if TEXT_COLUMN in model_input.columns:
            return model_input[TEXT_COLUMN].tolist()
        if len(model_input.columns) == 1:
            return model_input.iloc[:, 0].tolist()
        raise ValueError(
            f"input has columns {list(model_input.columns)}; the model needs a {TEXT_COLUMN!r} column"
        )
    if isinstance(model_input, pd.Series):
        return model_input.tolist()
    if isinstance(model_input, dict) and TEXT_COLUMN in model_input:
        return list(model_input[TEXT_COLUMN])
    if isinstance(model_input, list | tuple):
        return list(model_input)
    raise TypeError(
        f"model input is {type(model_input).__name__}; pass a DataFrame with a {TEXT_COLUMN!r} column "
        "or a list of strings"
    )


mlflow.models.set_model(TextClassifierModel())
