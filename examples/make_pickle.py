"""Write the iris model as a pickle, for the ``pickle`` model type.

Run from the repository root::

    python examples/make_pickle.py [OUTPUT]   # default: examples/iris.pkl

then deploy OUTPUT with model type ``pickle``, also from the repository root:
a pickle stores its class by reference (here ``examples.iris.NearestCentroid``),
so the serving process must be able to import ``examples.iris`` from its
working directory.
"""

import os
import pickle
import sys

sys.path.insert(0, os.getcwd())

from examples.iris import NearestCentroid  # noqa: E402


def main(argv):
    out = argv[1] if len(argv) > 1 else os.path.join("examples", "iris.pkl")
    with open(out, "wb") as f:
        pickle.dump(NearestCentroid(), f)
    print(out)


if __name__ == "__main__":
    main(sys.argv)
