from conftest import iris_config, predict


def test_deploy_predict_delete(client, home):
    svc = client.deploy(iris_config(), timeout=60)
    assert svc.is_running
    status, body = predict(svc.endpoint.prediction_url, [[5.0, 3.4, 1.5, 0.2]])
    assert (status, body) == (200, {"predictions": ["setosa"]})
    client.delete(svc.uuid, force=True)
    assert not (home / "services" / str(svc.uuid)).exists()
