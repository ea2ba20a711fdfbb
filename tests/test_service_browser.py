"""The web page in headless Chromium (Debian's chromium + chromium-driver, driven by selenium) against a real
uvicorn server on 127.0.0.1 (in a thread): load the page, upload a photo, see a caption, ask a question, save a screenshot.

Skips with the reason when chromium, chromedriver or selenium is missing (CI machines may not have them:
apt-get install chromium chromium-driver; pip install selenium). The screenshot is written to
$CAPTIONER_SCREENSHOT_DIR (default: the test's tmp dir)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import httpx

from _service_util import ROOT, serve_in_thread, tiny_vqa_checkpoint, wait_http_ready

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else shutil.which("chromedriver")

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)"),
    pytest.mark.skipif(CHROMEDRIVER is None, reason="chromedriver not installed (apt-get install chromium-driver)"),
]
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install selenium)")
pytest.importorskip("uvicorn", reason="service extra not installed (pip install -e '.[serve]')")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

PHOTO = ROOT / "service" / "static" / "samples" / "elephant.jpg"


@pytest.fixture
def browser(tmp_path):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1200,900", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    # no network beyond this machine: a page that needs a CDN (Swagger UI's default) fails here as it would
    # on an air-gapped deployment
    opts.add_argument("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1")
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    try:
        driver = webdriver.Chrome(options=opts, service=service)
    except Exception as e:  # noqa: BLE001  (a browser that cannot start here is an environment problem)
        pytest.skip(f"headless chromium could not start: {type(e).__name__}: {str(e).splitlines()[0]}")
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def known_choices(browser) -> None:
    box = browser.find_element(By.ID, "choices")
    box.clear()
    box.send_keys("grass\nwater\ndog\ncat")


def test_page_uploads_a_photo_shows_captions_and_answers(browser, tmp_path):
    ckpt = tiny_vqa_checkpoint(tmp_path / "tiny-vqa")
    (ckpt / "metrics.json").write_text('{"domain": "tiny test shapes."}')
    (ckpt / "README.md").write_text("# tiny\n\nA test model.\n")
    shots = Path(os.environ.get("CAPTIONER_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(checkpoint=ckpt, device="cpu", max_delay_ms=2))
    with serve_in_thread(app) as url:
        wait_http_ready(None, url)
        browser.get(url + "/")
        wait = WebDriverWait(browser, 30)
        assert browser.title == "captioner"
        wait.until(EC.text_to_be_present_in_element((By.ID, "model-info"), "words"))
        assert "with multiple-choice VQA" in browser.find_element(By.ID, "model-info").text
        domain = browser.find_element(By.ID, "model-domain")
        assert domain.text == "What it knows: tiny test shapes. Model card"
        assert domain.find_element(By.TAG_NAME, "a").get_attribute("href").endswith("/v1/models/card")

        # upload a photo through the file input: the page captions it at once
        browser.find_element(By.ID, "file-input").send_keys(str(PHOTO))
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#captions li.caption .caption-text")))
        captions = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#captions li.caption .caption-text")]
        assert len(captions) == 3 and all(captions)  # the page asks for 3 captions by default
        scores = browser.find_elements(By.CSS_SELECTOR, "#captions .score")
        assert all(s.text.startswith("log p = ") for s in scores)
        assert "batch of" in browser.find_element(By.ID, "caption-timings").text
        assert browser.find_element(By.ID, "preview").get_attribute("src").startswith("blob:")

        # ask a multiple-choice question: one probability bar per choice, one marked as chosen (the page's default
        # choices are words the tiny model does not know, which it refuses as one answer: give it words it knows)
        known_choices(browser)
        browser.find_element(By.ID, "vqa-button").click()
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#answers .answer.chosen")))
        rows = browser.find_elements(By.CSS_SELECTOR, "#answers .answer")
        assert len(rows) == 4
        pcts = [float(r.find_element(By.CSS_SELECTOR, ".pct").text.rstrip(" %")) for r in rows]
        assert sum(pcts) == pytest.approx(100, abs=0.5)
        assert not browser.find_element(By.ID, "error").is_displayed()
        browser.save_screenshot(str(shots / "service_page.png"))

        # a sample photo works the same way
        browser.find_elements(By.CSS_SELECTOR, ".sample")[0].click()  # horses-beach.jpg
        wait.until(lambda d: "horses-beach" in (d.execute_script("return currentImage && currentImage.name") or ""))
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#captions li.caption")))
        selected = browser.find_elements(By.CSS_SELECTOR, ".sample.selected")
        assert [s.get_attribute("data-src") for s in selected] == ["/static/samples/horses-beach.jpg"]
        # a file that fails: the error shows, and the sample is no longer marked as the image in use
        bad = tmp_path / "not-a-photo.jpg"
        bad.write_bytes(b"not an image at all")
        browser.find_element(By.ID, "file-input").send_keys(str(bad))
        wait.until(EC.visibility_of_element_located((By.ID, "error")))
        assert browser.find_elements(By.CSS_SELECTOR, ".sample.selected") == []
        assert httpx.get(url + "/v1/models/card").text.startswith("# tiny")
    assert (shots / "service_page.png").stat().st_size > 10_000


def test_api_docs_render_without_internet(browser, tiny_checkpoint, tmp_path):
    """/docs (Swagger UI) and /redoc load their scripts from the package, never a CDN."""
    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(checkpoint=tiny_checkpoint, device="cpu"))
    with serve_in_thread(app) as url:
        wait_http_ready(None, url)
        browser.get(url + "/docs")
        wait = WebDriverWait(browser, 30)
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".opblock-summary-path")))
        paths = {e.text.replace("\u200b", "") for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
        assert {"/v1/captions", "/v1/vqa", "/v1/models"} <= paths, paths
        browser.save_screenshot(str(tmp_path / "docs.png"))
        browser.get(url + "/redoc")
        wait.until(lambda d: "Caption an image" in d.find_element(By.TAG_NAME, "body").text)
        html = httpx.get(url + "/docs").text + httpx.get(url + "/redoc").text
    assert "cdn." not in html and "fonts.googleapis" not in html


def test_page_shows_word_heatmaps_for_an_attention_model(browser, tmp_path):
    """An attention model's captions come as word chips; hovering one lays its map over the photo."""
    import torch
    from conftest import TINY_WORDS, tiny_model_config

    from captioner.checkpoint import save_pretrained
    from captioner.config import VQAConfig
    from captioner.model import CaptionModel
    from captioner.tokenizer import Vocabulary
    from selenium.webdriver import ActionChains

    torch.manual_seed(0)
    cfg = tiny_model_config(inject="attention")
    cfg.vqa = VQAConfig(embed_dim=8, hidden_dim=8, mlp_dim=16, dropout=0.0)
    model = CaptionModel(cfg)
    with torch.no_grad():
        model.decoder.layers[0].W_ih.weight.mul_(10)
        model.decoder.attend.w.weight.mul_(30)  # peaked maps, so two words' overlays differ
    ckpt = save_pretrained(model, Vocabulary(TINY_WORDS), tmp_path / "tiny-att")
    shots = Path(os.environ.get("CAPTIONER_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    from service.app import create_app
    from service.settings import Settings

    with serve_in_thread(create_app(Settings(checkpoint=ckpt, device="cpu", max_delay_ms=2))) as url:
        wait_http_ready(None, url)
        browser.get(url + "/")
        wait = WebDriverWait(browser, 30)
        wait.until(EC.text_to_be_present_in_element((By.ID, "model-info"), "with attention"))
        browser.find_element(By.ID, "file-input").send_keys(str(PHOTO))
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#captions .word")))
        canvas = browser.find_element(By.ID, "heatmap")
        assert not canvas.is_displayed()
        chips = browser.find_elements(By.CSS_SELECTOR, "#captions li.caption:first-child .word")
        first = browser.find_element(By.CSS_SELECTOR, "#captions li.caption:first-child .caption-text").text
        assert [c.text for c in chips] == first.split()
        seen = []
        for chip in chips[:2]:
            ActionChains(browser).move_to_element(chip).perform()
            wait.until(EC.visibility_of(canvas))
            assert "active" in chip.get_attribute("class")
            seen.append(browser.execute_script("return arguments[0].toDataURL()", canvas))
            # the overlay is a square over the photo's centre crop
            box, img = canvas.rect, browser.find_element(By.ID, "preview").rect
            assert box["width"] == pytest.approx(box["height"], abs=1)
            assert box["width"] == pytest.approx(min(img["width"], img["height"]) * 32 / 36, abs=2)
            assert img["x"] <= box["x"] and box["x"] + box["width"] <= img["x"] + img["width"] + 1
        if len(chips) > 1:
            assert seen[0] != seen[1]
        ActionChains(browser).move_to_element(chips[0]).perform()
        browser.save_screenshot(str(shots / "service_page_attention.png"))
        ActionChains(browser).move_to_element(browser.find_element(By.TAG_NAME, "h1")).perform()
        wait.until(EC.invisibility_of_element(canvas))
        # the VQA head reads v from the same grid
        known_choices(browser)
        browser.find_element(By.ID, "vqa-button").click()
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#answers .answer.chosen")))
    assert (shots / "service_page_attention.png").stat().st_size > 10_000
