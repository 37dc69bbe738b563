"""End to end in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium):
the whole Deep Network Quantizer workflow on the shipped ResNet-20 and real CIFAR-10, with a
screenshot of each step (saved under $NETQUANT_SCREENSHOTS, default the test's tmp folder)."""
import os
import shutil
import time
from pathlib import Path

import pytest

from netquant.app.server import Server

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        if os.environ.get("CI"):
            pytest.fail("CI needs chromium and chromedriver (.ci/run installs them)")
        pytest.skip("chromium / chromedriver not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield d
    d.quit()


def wait_for(fn, timeout=240, what=""):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = fn()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_whole_workflow_in_the_browser(browser, cifar_path, tmp_path):
    from selenium.webdriver.common.by import By

    shots = Path(os.environ.get("NETQUANT_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    server = Server(data=str(cifar_path)).start()
    d = browser
    try:
        d.get(server.url)
        status = d.find_element(By.ID, "status")
        wait_for(lambda: "CIFAR-10 test set" in status.text, 60, "the network list")
        d.find_element(By.ID, "btn-new").click()
        wait_for(lambda: d.find_element(By.ID, "session-info").text.startswith("Session"), 60, "a session")
        d.save_screenshot(str(shots / "1-new-session.png"))

        d.find_element(By.ID, "cal-count").clear()
        d.find_element(By.ID, "cal-count").send_keys("100")
        d.find_element(By.ID, "btn-calibrate").click()
        wait_for(lambda: d.find_element(By.ID, "step-table").is_displayed(), 300, "the calibration table")
        rows = d.find_elements(By.CSS_SELECTOR, "#caltable tbody tr")
        assert len(rows) == 80  # one row per weight, bias and activation tensor
        hists = d.find_elements(By.CSS_SELECTOR, "#caltable svg.hist rect.in")
        assert len(hists) > 100  # histograms rendered
        assert d.find_elements(By.CSS_SELECTOR, "#caltable svg.hist rect.grey")  # greyed regions
        first = rows[2].find_elements(By.TAG_NAME, "td")
        assert first[0].text == "convInp_reluInp_Weights" and first[1].text == "convInp"
        d.save_screenshot(str(shots / "2-calibration.png"))
        # filter and sort
        from selenium.webdriver.common.keys import Keys

        d.find_element(By.ID, "filter").send_keys("S3U3")
        assert len(d.find_elements(By.CSS_SELECTOR, "#caltable tbody tr")) == 6  # weights, bias, output of 2 convs
        d.find_element(By.ID, "filter").send_keys(Keys.BACKSPACE * 4)
        assert len(d.find_elements(By.CSS_SELECTOR, "#caltable tbody tr")) == 80
        d.find_elements(By.CSS_SELECTOR, "#caltable thead th")[3].click()  # sort by MinValue
        cells = [r.find_elements(By.TAG_NAME, "td")[3].text for r in d.find_elements(By.CSS_SELECTOR, "#caltable tbody tr")]
        values = [float(c) for c in cells]
        assert values == sorted(values)
        d.find_elements(By.CSS_SELECTOR, "#caltable thead th")[0].click()  # back to names

        # softmax cannot be quantized: its box is disabled; untick a conv
        soft = d.find_element(By.CSS_SELECTOR, "input[data-layer='softmax']")
        assert not soft.is_enabled()
        box = d.find_element(By.CSS_SELECTOR, "input[data-layer='S3U3_conv2']")
        box.click()
        wait_for(lambda: "keep in float" in d.find_element(By.ID, "status").text, 30, "the layer change")
        d.save_screenshot(str(shots / "3-layers.png"))

        d.find_element(By.ID, "val-count").clear()
        d.find_element(By.ID, "val-count").send_keys("200")
        d.find_element(By.ID, "btn-validate").click()
        wait_for(lambda: d.find_elements(By.CSS_SELECTOR, "table[data-metric='top1']"), 300, "validation results")
        t = d.find_element(By.CSS_SELECTOR, "table[data-metric='top1']").text
        assert "Floating-Point" in t and "Quantized" in t and "1089896" in t
        assert "agreement" in d.find_element(By.ID, "results").text
        assert d.find_elements(By.CSS_SELECTOR, "#sqnr svg.chart rect")
        d.execute_script("document.getElementById('step-validate').scrollIntoView()")
        d.save_screenshot(str(shots / "4-results.png"))

        # export the quantizer through the page, then import it into a new session
        sid = d.find_element(By.ID, "session-info").text.split()[1].rstrip(":")
        d.find_element(By.ID, "btn-export-q").click()
        wait_for(lambda: "downloaded quantizer.nq" in d.find_element(By.ID, "export-info").text, 60, "the export")
        exported = server.app.registry.get(sid).folder / "export.nq"
        d.find_element(By.ID, "import-file").send_keys(str(exported))
        d.find_element(By.ID, "btn-import").click()
        wait_for(lambda: "imported" in d.find_element(By.ID, "status").text, 60, "the import")
        wait_for(lambda: len(d.find_elements(By.CSS_SELECTOR, "#caltable tbody tr")) == 80, 60, "the imported table")
        new_sid = d.find_element(By.ID, "session-info").text.split()[1].rstrip(":")
        assert new_sid != sid
        assert not d.find_element(By.CSS_SELECTOR, "input[data-layer='S3U3_conv2']").is_selected()
        d.save_screenshot(str(shots / "5-imported.png"))
    finally:
        server.close()


@pytest.mark.slow
@pytest.mark.compiler
def test_own_onnx_model_and_image_zip_in_the_browser(browser, cifar, cifar_path, tmp_path):
    """Upload an ONNX model (48x48 input, the CIFAR-10 mean/std in the input spec form) and a
    zip of CIFAR-10 PNGs in class folders; calibrate, validate on it, export; the page shows the
    network's input, the data set's class names and a per-class result table."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from netquant.data import CIFAR10_MEAN, CIFAR10_STD, CLASSES
    from test_app_server import image_folder_zip, onnx_model, pick

    shots = Path(os.environ.get("NETQUANT_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    model = tmp_path / "resnet_b.onnx"
    model.write_bytes(onnx_model(tmp_path, 48))
    images = tmp_path / "cifar-pngs.zip"
    images.write_bytes(image_folder_zip(*pick(cifar.test, (1, 3, 5), 8), CLASSES))
    server = Server(data=str(cifar_path)).start()
    d = browser
    try:
        d.get(server.url)
        status = d.find_element(By.ID, "status")
        wait_for(lambda: "CIFAR-10 test set" in status.text, 60, "the network list")
        d.find_element(By.ID, "model-file").send_keys(str(model))
        d.find_element(By.CSS_SELECTOR, "#spec-box summary").click()
        d.find_element(By.ID, "spec-mean").send_keys(", ".join(map(str, CIFAR10_MEAN)))
        d.find_element(By.ID, "spec-std").send_keys(", ".join(map(str, CIFAR10_STD)))
        d.find_element(By.ID, "btn-new").click()
        info = d.find_element(By.ID, "session-info")
        wait_for(lambda: info.text.startswith("Session"), 60, "a session")
        assert "resnet_b, input 3x48x48, 10 outputs" in info.text and "mean 0.4914" in info.text
        assert "takes 3x48x48 images; add one" in d.find_element(By.ID, "datasets").text  # no CIFAR-10 here

        d.find_element(By.ID, "data-file").send_keys(str(images))
        d.find_element(By.ID, "data-classes").send_keys(",".join(CLASSES))
        d.find_element(By.ID, "btn-data").click()
        wait_for(lambda: "data set cifar-pngs" in status.text, 60, "the data set")
        listed = d.find_element(By.ID, "datasets").text
        assert "cifar-pngs (data1): 24 images of 3x48x48, 10 classes: airplane, automobile" in listed
        assert Select(d.find_element(By.ID, "cal-data")).first_selected_option.text == "cifar-pngs"
        assert d.find_element(By.ID, "cal-count").get_attribute("value") == "24"  # 200 would not fit
        d.save_screenshot(str(shots / "6-own-model-data.png"))

        d.find_element(By.ID, "btn-calibrate").click()
        wait_for(lambda: d.find_element(By.ID, "step-table").is_displayed(), 120, "the calibration table")
        assert "calibrated on 24 images" in d.find_element(By.ID, "table-info").text
        assert len(d.find_elements(By.CSS_SELECTOR, "#caltable tbody tr")) > 10

        Select(d.find_element(By.ID, "val-data")).select_by_visible_text("cifar-pngs")
        d.find_element(By.ID, "btn-validate").click()
        wait_for(lambda: d.find_elements(By.CSS_SELECTOR, "#per-class-table"), 120, "validation results")
        assert "Quantized" in d.find_element(By.CSS_SELECTOR, "table[data-metric='top1']").text
        per_class = d.find_element(By.ID, "per-class").text
        assert "Per class (cifar-pngs)" in per_class
        body = d.find_elements(By.CSS_SELECTOR, "#per-class-table tbody tr")
        assert [r.find_elements(By.TAG_NAME, "td")[1].text for r in body] == ["automobile", "cat", "dog"]
        assert [r.find_elements(By.TAG_NAME, "td")[0].text for r in body] == ["1", "3", "5"]
        d.execute_script("document.getElementById('step-validate').scrollIntoView()")
        d.save_screenshot(str(shots / "7-own-model-results.png"))

        d.find_element(By.ID, "btn-export-onnx").click()
        wait_for(lambda: "downloaded network_int8.onnx" in d.find_element(By.ID, "export-info").text, 60, "ONNX")
        d.find_element(By.ID, "btn-export-q").click()
        wait_for(lambda: "downloaded quantizer.nq" in d.find_element(By.ID, "export-info").text, 60, "the quantizer")
        d.find_element(By.ID, "btn-codegen").click()
        wait_for(lambda: d.find_element(By.ID, "btn-export-code").is_enabled(), 240, "the C code")
        assert d.find_element(By.ID, "export-info").text == "C sources generated and compiled"
    finally:
        server.close()
