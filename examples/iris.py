"""A tiny, dependency-free iris classifier for trying out modeld.

It is a nearest-centroid model: each class is represented by the mean of its
50 samples in Fisher's iris data set, and an instance is assigned to the class
whose mean is closest (Euclidean distance). It is a simple baseline, not a
tuned model, but it does separate the three species reasonably well.

Deploy it with the built-in python runtime as ``examples/iris.py:model``
(from the repository root). Request::

    POST /v1/models/<name>:predict
    {"instances": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]}

Each instance is [sepal length, sepal width, petal length, petal width] in cm;
the response is {"predictions": ["setosa", "virginica"]}.
"""

FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")

# Per-class means of the iris data set (cm).
CENTROIDS = {
    "setosa": (5.006, 3.428, 1.462, 0.246),
    "versicolor": (5.936, 2.770, 4.260, 1.326),
    "virginica": (6.588, 2.974, 5.552, 2.026),
}


class NearestCentroid:
    """Classify by the nearest class centroid; ``predict(instances) -> list[str]``."""

    def __init__(self, centroids=None):
        self.centroids = dict(CENTROIDS if centroids is None else centroids)

    def _features(self, instance):
        if isinstance(instance, dict):
            instance = [instance[name] for name in FEATURES]
        values = [float(v) for v in instance]
        if len(values) != len(FEATURES):
            raise ValueError(f"each instance needs {len(FEATURES)} features {FEATURES}, got {len(values)}")
        return values

    def predict(self, instances):
        predictions = []
        for instance in instances:
            x = self._features(instance)
            predictions.append(
                min(self.centroids, key=lambda c: sum((a - b) ** 2 for a, b in zip(x, self.centroids[c])))
            )
        return predictions


model = NearestCentroid()
