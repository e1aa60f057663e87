import time, httpx, pytest
from tests.conftest import QUIET, encode
from tests.test_serve import _refused_uploads
pytestmark = pytest.mark.serve

def test_mem(serve_cluster, yolo_export, scenes):
    from ray import serve
    from detserve.serve.app import application
    serve.run(application({"model": str(yolo_export)}, {"num_replicas": 1, "autoscaling_config": None}), name="limits", route_prefix="/unlimited", blocking=False, logging_config=QUIET)
    url = f"{serve_cluster}/unlimited"
    rss = lambda: round(httpx.get(f"{url}/stats", timeout=30).json()["rss_bytes"] / 2**20)
    for _ in range(3):
        httpx.post(f"{url}/predict", content=encode(scenes[0].image), headers={"content-type": "image/png"}, timeout=60)
    print("\nstart", [rss() for _ in range(3)])
    seq = []
    for i in range(20):
        _refused_uploads(url, 200 * 2**20, 1, chunked=True)
        seq.append(rss())
    print("each", seq)
    for _ in range(5):
        time.sleep(1); print("idle", rss())
    serve.delete("limits")
