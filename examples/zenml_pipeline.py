"""A ZenML pipeline that trains a tiny iris classifier and deploys it through modeld.

Needs ``pip install 'modeld[zenml]'`` and a ZenML stack whose model deployer
has the ``modeld`` flavor (README, "ZenML"). From the repository root::

    python examples/zenml_pipeline.py

``train`` fits a nearest-centroid model (examples/iris.py) on 15 rows of
Fisher's iris data; ``deploy`` pickles it into the stack's artifact store and
deploys it with the active model deployer in continuous-deployment mode, so
running the pipeline again replaces the model in place: same port, same URL,
and the old version answers until the new one is healthy. The script ends
by printing the prediction URL ZenML recorded.
"""

from __future__ import annotations

import os
import pickle
import sys
from typing import Dict, List

from typing_extensions import Annotated
from zenml import get_step_context, pipeline, step
from zenml.client import Client

from modeld_zenml import ModeldDeploymentConfig, ModeldDeploymentService, ModeldModelDeployer

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from iris import FEATURES, NearestCentroid  # noqa: E402

# Rows 1-5, 51-55 and 101-105 of Fisher's iris data set (cm).
SAMPLES = {
    "setosa": [[5.1, 3.5, 1.4, 0.2], [4.9, 3.0, 1.4, 0.2], [4.7, 3.2, 1.3, 0.2], [4.6, 3.1, 1.5, 0.2], [5.0, 3.6, 1.4, 0.2]],
    "versicolor": [[7.0, 3.2, 4.7, 1.4], [6.4, 3.2, 4.5, 1.5], [6.9, 3.1, 4.9, 1.5], [5.5, 2.3, 4.0, 1.3], [6.5, 2.8, 4.6, 1.5]],
    "virginica": [[6.3, 3.3, 6.0, 2.5], [5.8, 2.7, 5.1, 1.9], [7.1, 3.0, 5.9, 2.1], [6.3, 2.9, 5.6, 1.8], [6.5, 3.0, 5.8, 2.2]],
}


@step
def train() -> Annotated[Dict[str, List[float]], "centroids"]:
    """The mean of each class's samples: all a nearest-centroid model learns."""
    return {label: [sum(col) / len(rows) for col in zip(*rows)] for label, rows in SAMPLES.items()}


@step(enable_cache=False)
def deploy(centroids: Dict[str, List[float]], model_name: str = "iris") -> Annotated[ModeldDeploymentService, "service"]:
    """Pickle the model into the artifact store and serve it with the stack's modeld deployer."""
    context = get_step_context()
    folder = os.path.join(Client().active_stack.artifact_store.path, "modeld")
    os.makedirs(folder, exist_ok=True)
    model_path = os.path.join(folder, f"{model_name}-{context.pipeline_run.id}.pkl")
    with open(model_path, "wb") as f:
        pickle.dump(NearestCentroid(centroids), f)
    config = ModeldDeploymentConfig(
        model_name=model_name,
        model_uri=model_path,
        model_type="pickle",
        working_dir=HERE,  # the pickle names its class iris.NearestCentroid: the server imports iris from here
        pipeline_name=context.pipeline.name,
        pipeline_step_name=context.step_run.name,
        pipeline_run_id=str(context.pipeline_run.id),
        description=f"nearest centroid on {', '.join(FEATURES)}",
    )
    deployer = ModeldModelDeployer.get_active_model_deployer()
    service = deployer.deploy_model(
        config,
        service_type=ModeldDeploymentService.SERVICE_TYPE,
        continuous_deployment_mode=True,
        timeout=120,
    )
    return service


@pipeline
def iris_pipeline(model_name: str = "iris") -> None:
    deploy(train(), model_name=model_name)


def main() -> None:
    run = iris_pipeline()
    service = run.steps["deploy"].outputs["service"][0].load()
    print(f"zenml service  {service.uuid}")
    print(f"prediction url {service.prediction_url}")


if __name__ == "__main__":
    main()
