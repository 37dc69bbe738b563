"""The app's Sensitivity and mixed-precision step: the sensitivity sweep and the precision search
as background jobs over the API, the per-layer precision selector, and the same step clicked
through in headless Chromium (the table, the charts, the chosen bit widths in the layer list)."""
import os
from pathlib import Path

import numpy as np
import pytest

from netquant.app.server import Server
from netquant.data import validation_set
from test_app_browser import browser, text, wait_for  # noqa: F401  (the browser fixture)
from test_app_server import call, calibrated_session, wait


JOB_SECONDS = 900   # the search and sensitivity jobs take minutes on a loaded machine


@pytest.fixture(scope="module")
def server(cifar_path):
    s = Server(data=str(cifar_path)).start()
    yield s
    s.close()


@pytest.fixture(scope="module")
def session(server):
    """A session on the shipped network calibrated on 20 CIFAR-10 training images."""
    return calibrated_session(server, JOB_SECONDS)


def _precisions(server, sid) -> dict:
    _, c = call(server, "GET", f"/api/sessions/{sid}/calibration")
    return {l["name"]: l["precision"] for l in c["layers"] if l["precision"]}


@pytest.mark.slow
def test_sensitivity_job_gives_the_library_table(server, session):
    sid = session
    assert call(server, "GET", f"/api/sessions/{sid}/sensitivity")[0] == 409
    assert call(server, "POST", f"/api/sessions/{sid}/sensitivity", {"metric": "os:system"})[0] == 400
    code, r = call(server, "POST", f"/api/sessions/{sid}/sensitivity", {"count": 8, "metric": "top1"})
    assert code == 200 and r["started"] == "sensitivity"
    assert wait(server, sid, JOB_SECONDS)["state"] == "done"
    code, t = call(server, "GET", f"/api/sessions/{sid}/sensitivity")
    assert code == 200 and t["images"] == 8 and t["metric"] == "top1"
    s = server.app.registry.get(sid)
    images = validation_set(server.app.cifar, 8, 0)
    lib = s.quantizer.sensitivity(images, workers=1)
    assert [r["Layer"] for r in t["rows"]] == list(lib.Layer)
    assert [r["QuantizedOnly"] for r in t["rows"]] == list(lib.QuantizedOnly)
    assert [r["FloatOnly"] for r in t["rows"]] == list(lib.FloatOnly)
    assert (t["float"], t["int8"]) == (lib.attrs["float"], lib.attrs["int8"])
    assert call(server, "GET", f"/api/sessions/{sid}")[1]["sensitivity"] is True


def test_per_layer_precision_selector(server, session):
    sid, layer = session, "S3U1_conv2"
    code, r = call(server, "POST", f"/api/sessions/{sid}/layers", {"layer": layer, "precision": "w4a8"})
    assert code == 200 and r["config"]["overrides"][layer] == {"weight_bits": 4}
    assert _precisions(server, sid)[layer] == "w4a8"
    q = server.app.registry.get(sid).quantizer
    assert np.abs(q.quantize().qgraph.node(layer).params["weight"]).max() <= 7
    _, details = call(server, "GET", f"/api/sessions/{sid}/calibration")
    row = next(x for x in details["rows"] if x["Optimized Layer Name"] == f"{layer}_Weights")
    assert row["Quantize"]
    code, r = call(server, "POST", f"/api/sessions/{sid}/layers", {"layer": layer, "precision": "float"})
    assert code == 200 and layer in r["float_layers"] and layer not in r["config"]["overrides"]
    assert _precisions(server, sid)[layer] == "float"
    code, r = call(server, "POST", f"/api/sessions/{sid}/layers", {"layer": layer, "precision": "int8"})
    assert code == 200 and layer not in r["float_layers"] and _precisions(server, sid)[layer] == "int8"
    assert call(server, "POST", f"/api/sessions/{sid}/layers", {"layer": layer, "precision": "int3"})[0] == 400
    code, r = call(server, "POST", f"/api/sessions/{sid}/layers", {"layer": "add11_relu11", "precision": "w4a8"})
    assert code == 400 and "conv and fully connected" in r["error"]


def test_precision_search_job_sets_the_chosen_configuration(server, session):
    sid = session
    assert call(server, "POST", f"/api/sessions/{sid}/auto_precision", {"max_drop": "abc"})[0] == 400
    code, _ = call(server, "POST", f"/api/sessions/{sid}/auto_precision",
                   {"count": 16, "max_drop": 100, "max_evaluations": 4})
    assert code == 200 and wait(server, sid, JOB_SECONDS)["state"] == "done"
    code, s = call(server, "GET", f"/api/sessions/{sid}/auto_precision")
    # the int8 network and 22 one-layer W4A8 probes, then 4 prefixes (a budget of 100 fits them all)
    assert code == 200 and len(s["explored"]) == 27 and s["max_drop"] == 100
    c = s["chosen"]
    assert c["Drop"] <= 100 and c["MemoryBytes"] < s["int8_bytes"] and c["W4A8"] >= 1
    mem = [p["MemoryBytes"] for p in s["front"]]
    assert mem == sorted(mem) and c["MemoryBytes"] in mem
    # the session's quantizer is the chosen one: the layer list shows its bit widths
    p = _precisions(server, sid)
    assert sum(v == "w4a8" for v in p.values()) == c["W4A8"] and sum(v == "float" for v in p.values()) == c["Float"]
    q = server.app.registry.get(sid).quantizer
    assert q.learnable_memory()[1] == c["MemoryBytes"]
    info = call(server, "GET", f"/api/sessions/{sid}")[1]
    assert info["searched"] is True and info["sensitivity"] is False   # the network changed: the table went


@pytest.mark.browser
@pytest.mark.slow
def test_sensitivity_and_search_in_the_browser(browser, cifar_path, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By

    shots = Path(os.environ.get("NETQUANT_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    server = Server(data=str(cifar_path)).start()
    d = browser
    css = lambda sel: d.find_elements(By.CSS_SELECTOR, sel)  # noqa: E731

    def fill(element_id, value):
        d.find_element(By.ID, element_id).clear()
        d.find_element(By.ID, element_id).send_keys(value)

    try:
        d.get(server.url)
        status = d.find_element(By.ID, "status")
        wait_for(lambda: "CIFAR-10 test set" in status.text, 60, "the network list")
        d.find_element(By.ID, "btn-new").click()
        wait_for(lambda: text(d, "session-info").startswith("Session"), 60, "a session")
        fill("cal-count", "20")
        d.find_element(By.ID, "btn-calibrate").click()
        wait_for(lambda: d.find_element(By.ID, "step-sensitivity").is_displayed(), 300, "the sensitivity step")
        assert {s.get_attribute("value") for s in css("select.precision")} == {"int8"}
        fill("sens-count", "8")
        d.find_element(By.ID, "btn-sensitivity").click()
        wait_for(lambda: css("#sens-table tbody tr"), 600, "the sensitivity table")
        rows = css("#sens-table tbody tr")
        assert len(rows) >= 22 and text(d, "sens-msg").startswith("8 images")
        drops = [float(r.find_elements(By.TAG_NAME, "td")[4].text) for r in rows]
        assert drops == sorted(drops, reverse=True)   # most harmful first
        assert len(css("svg.sens-chart rect")) == len(rows) and len(css("svg.sens-chart circle.gain")) == len(rows)
        d.execute_script("document.getElementById('step-sensitivity').scrollIntoView()")
        d.save_screenshot(str(shots / "3c-sensitivity.png"))

        fill("ap-count", "8")
        fill("ap-drop", "100")
        fill("ap-evals", "4")
        d.find_element(By.ID, "btn-auto").click()
        wait_for(lambda: css("#ap-front-table tbody tr"), 600, "the Pareto front")
        msg = text(d, "ap-msg")
        assert msg.startswith("chosen: top1") and "W4A8" in msg
        w4 = int(msg.split(" W4A8")[0].rsplit(" ", 1)[1])
        assert w4 >= 1 and sum(s.get_attribute("value") == "w4a8" for s in css("select.precision")) == w4
        assert len(css("svg.pareto circle.explored")) == 27 and css("svg.pareto circle.chosen")
        assert css("svg.pareto polyline.front")
        d.execute_script("document.getElementById('ap-chart').scrollIntoView()")
        d.save_screenshot(str(shots / "3d-precision-search.png"))
        # the selector sets one layer's precision by hand
        sel = next(s for s in css("select.precision") if s.get_attribute("value") == "int8")
        layer = sel.get_attribute("data-layer")
        from selenium.webdriver.support.ui import Select

        Select(sel).select_by_value("w4a8")
        wait_for(lambda: f"{layer}: W4A8" in status.text, 30, "the precision change")
        assert d.find_element(By.CSS_SELECTOR, f"select.precision[data-layer='{layer}']").get_attribute("value") == "w4a8"
    finally:
        server.close()
