"""Deploy the bundled iris model through the modeld daemon and ask it for a prediction.

Run from anywhere: ``python examples/quickstart.py``. The daemon starts by
itself on first use (state in $MODELD_HOME, default $XDG_STATE_HOME/modeld).
Running it again replaces the service in place: same uuid, same URL.
"""

import http.client
import json
import os
import shutil
import sys
import sysconfig
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
    print("\nThe modeld daemon and this model server keep running (run this again: the same service, replaced in place).")
    print("  modeld ls                     list the services")
    print(f"  modeld rm {config.model_name:<19} remove this one (its server stops)")
    print("  modeld daemon stop --all      stop the daemon, its gateway and every server")
    print(where_modeld_is())


def where_modeld_is() -> str:
    """Where the ``modeld`` command was installed, and how to get it on PATH."""
    scripts = sysconfig.get_path("scripts")
    command = os.path.join(scripts, "modeld")
    found = shutil.which("modeld")
    on_path = found is not None and os.path.exists(command) and os.path.samefile(found, command)
    if on_path:
        return f"modeld ({command}) is on your PATH."
    if sys.prefix != sys.base_prefix:  # a virtualenv: its activate script puts its bin first on PATH
        return f"modeld is {command}: `source {os.path.join(scripts, 'activate')}` puts it on your PATH."
    return f"modeld is {command}: add {scripts} to your PATH."


if __name__ == "__main__":
    main()
