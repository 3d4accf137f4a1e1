"""The code of the pyfunc model (MLflow's "models from code"): the model is this file, not a pickle."""

from mlflow.models import set_model

from tlx_mlflow.model import TlxModel

set_model(TlxModel())
