"""Deploy the bundled iris model through the modeld daemon and ask it for a prediction.

Run from anywhere: ``python examples/quickstart.py``. The daemon starts by
itself on first use (state in $MODELD_HOME, default $XDG_STATE_HOME/modeld).
Running it again replaces the service in place: same uuid, same URL.
"""

import http.client
import json
import os
from urllib.parse import urlsplit

from daemon import ServiceConfig
from deployers import LocalDaemonModelDeployer, LocalDaemonModelDeployerConfig

HERE = os.path.dirname(os.path.abspath(__file__))


def post_json(url: str, payload: object) -> object:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("POST", parts.path, body=json.dumps(payload), headers={"content-type": "application/json"})
    response = conn.getresponse()
    return json.loads(response.read())


def main() -> None:
    deployer = LocalDaemonModelDeployer(config=LocalDaemonModelDeployerConfig())
    config = ServiceConfig(
        model_name="iris",
        model_uri=os.path.join(HERE, "iris.py") + ":model",
        model_type="python",
        pipeline_name="quickstart",
        pipeline_step_name="deploy",
        pipeline_run_id="run-1",
    )
    service = deployer.deploy_model(config, replace=True, timeout=60)
    info = deployer.get_model_server_info(service)
    print(f"service   {info['UUID']} ({info['STATE']}, pid {info['PID']})")
    print(f"predict   POST {info['PREDICTION_URL']}")
    instances = [[5.1, 3.5, 1.4, 0.2], [6.2, 2.9, 4.3, 1.3], [6.9, 3.1, 5.4, 2.1]]
    answer = post_json(info["PREDICTION_URL"], {"instances": instances})
    print(f"request   {json.dumps({'instances': instances})}")
    print(f"response  {json.dumps(answer)}")
    print("\nnext: modeld ls | modeld logs", str(service.uuid)[:8], "| modeld rm", str(service.uuid)[:8])


if __name__ == "__main__":
    main()
