"""Version 2 of the iris example: the same nearest-centroid model, answering with distances.

Deploy it over version 1 to see continuous deployment (same uuid, same URL)::

    modeld deploy --model-name iris --model-uri examples/iris.py:model --pipeline-name train
    modeld deploy --model-name iris --model-uri examples/iris_v2.py:model --pipeline-name train --replace

Predictions are ``{"label": "setosa", "distance": 0.12}``.
"""

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from iris import NearestCentroid  # noqa: E402


class NearestCentroidV2(NearestCentroid):
    def predict(self, instances):
        answers = []
        for label, instance in zip(super().predict(instances), instances):
            x = self._features(instance)
            distance = math.dist(x, self.centroids[label])
            answers.append({"label": label, "distance": round(distance, 3)})
        return answers


model = NearestCentroidV2()
