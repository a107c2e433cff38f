"""serving/protocols/page.html, the page served at GET / beside the HTTP/REST port: self-contained, and
in headless Chromium against a real server it ranks an uploaded JPEG as our own gRPC Predict does and
shows the server's message for a file that is not an image.

The browser tests skip without selenium or without Chromium and its chromedriver (Debian: `apt-get
install chromium chromium-driver`); the check that the page references nothing outside itself needs
neither.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from html.parser import HTMLParser
from importlib import resources

import numpy as np
import pytest
from conftest import server_config
from PIL import Image

from serving.client import Client
from serving.gen.classifier.v1 import classifier_pb2 as pb
from serving.server import Server

try:  # only the browser tests need selenium; they skip without it
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait
except ImportError:
    webdriver = None

PAGE = resources.files("serving.protocols") / "page.html"
IDS = ["file", "model", "results", "model-version", "tta", "latency", "error"]  # what tests and users rely on
WAIT_S = 30  # an answer takes well under a second; a loaded CI machine may take far longer


def jpeg(size=(800, 600), seed=0) -> bytes:
    """A noisy photo-like JPEG, about 1 MB at the default size: far more bytes than one
    String.fromCharCode.apply call takes, so a page that base64s it in one piece fails here."""
    rng = np.random.default_rng(seed)
    a = np.clip(np.array([200, 50, 40]) + rng.normal(0, 60, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=95)
    return buf.getvalue()


class IdCollector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: dict[str, tuple[str, dict]] = {}  # id -> (tag, attributes)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if "id" in attributes:
            self.ids[attributes["id"]] = (tag, attributes)


class TestSelfContained:
    """The page must work offline and behind any firewall the server works behind: nothing fetched."""

    @pytest.mark.parametrize(
        "pattern",
        [
            r"https?://",  # an absolute URL anywhere: src, href, fetch(), CSS
            r"""\b(?:src|href)\s*=\s*["']?\s*//""",  # a protocol-relative one
            r"<script\b[^>]*\bsrc\b",
            r"<link\b",
            r"@import\b",
            r"\burl\(",  # CSS backgrounds and fonts
        ],
    )
    def test_references_nothing_outside(self, pattern):
        found = re.search(pattern, PAGE.read_text(encoding="utf-8"), re.IGNORECASE)
        assert found is None, f"{PAGE} references something outside itself: {found.group(0)!r}"

    def test_has_the_stable_ids(self):
        parser = IdCollector()
        parser.feed(PAGE.read_text(encoding="utf-8"))
        assert set(IDS) <= parser.ids.keys()
        tag, attributes = parser.ids["file"]
        assert (tag, attributes.get("type")) == ("input", "file")
        assert parser.ids["model"][0] == "select"


@dataclass
class Site:
    """A server on loopback: the page's address, and our own gRPC Predict to compare it with."""

    url: str
    predict: Callable[[bytes], pb.PredictResponse]


@pytest.fixture(scope="module")
def site(tiny_bundle):
    with (
        Server(server_config(tiny_bundle, http_port=0)) as server,
        Client(f"127.0.0.1:{server.port}", timeout=30) as client,
    ):
        yield Site(url=f"http://127.0.0.1:{server.http_port}/", predict=client.predict)


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module."""
    if webdriver is None:
        pytest.skip("selenium is not installed (pip install selenium)")
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not on PATH (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in (
        "--headless=new",
        "--no-sandbox",  # the sandbox cannot start as root or in most containers; the page is our own
        "--disable-gpu",
        "--disable-dev-shm-usage",  # Docker's 64 MB /dev/shm is too small for a renderer
        "--window-size=1000,700",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    yield driver
    driver.quit()


def open_page(browser, site: Site) -> None:
    """Load the page afresh and wait until it has listed the models (the select is enabled then)."""
    browser.get(site.url)
    WebDriverWait(browser, WAIT_S).until(lambda d: d.find_element(By.ID, "model").is_enabled())


def upload(browser, path) -> None:
    browser.find_element(By.ID, "file").send_keys(str(path))


def text(browser, element_id: str) -> str:
    return browser.find_element(By.ID, element_id).text


def post(url: str, body: dict) -> tuple[int, dict]:
    """The server's status and JSON answer, refusals included."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


class TestPageInChromium:
    def test_preselects_the_first_ready_model(self, browser, site):
        _, index = post(site.url + "v2/repository/index", {"ready": True})
        open_page(browser, site)
        options = browser.find_elements(By.CSS_SELECTOR, "#model option")
        names = list(dict.fromkeys(m["name"] for m in index))  # one entry per version; the page lists each name once
        assert [o.get_attribute("value") for o in options] == names
        assert browser.find_element(By.ID, "model").get_attribute("value") == names[0]

    def test_ranks_as_predict_does(self, browser, site, tmp_path):
        photo = tmp_path / "photo.jpg"
        photo.write_bytes(jpeg())
        expected = site.predict(photo.read_bytes())
        open_page(browser, site)
        upload(browser, photo)
        error = browser.find_element(By.ID, "error")
        WebDriverWait(browser, WAIT_S).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, "#results .row") or error.is_displayed()
        )
        assert not error.is_displayed(), error.text
        rows = browser.find_elements(By.CSS_SELECTOR, "#results .row")
        labels = [row.find_element(By.CLASS_NAME, "label").text for row in rows]
        percents = [row.find_element(By.CLASS_NAME, "prob").text for row in rows]
        assert labels == [p.label for p in expected.predictions]
        assert all(re.fullmatch(r"\d{1,3}\.\d%", p) for p in percents), percents
        for label, percent, p in zip(labels, percents, expected.predictions, strict=True):
            # Equal to the page's printed precision, 0.1 percentage point (half of it either way).
            assert abs(float(percent[:-1]) - 100 * p.probability) <= 0.05 + 1e-6, (label, percent, p.probability)
        assert text(browser, "model-version") == f"{expected.model_name} {expected.model_version}"
        views = list(expected.tta_views)
        assert len(views) > 1  # the tiny bundle applies TTA by default
        assert text(browser, "tta") == f"TTA: {len(views)} views ({', '.join(views)})"
        assert re.fullmatch(r"\d+ ms", text(browser, "latency")), text(browser, "latency")

    def test_shows_the_servers_error(self, browser, site, tmp_path):
        notes = tmp_path / "notes.txt"
        notes.write_bytes(b"not an image, only text")
        image = {"name": "IMAGE", "datatype": "BYTES", "shape": [1], "parameters": {"content_type": "base64"}}
        data = [base64.b64encode(notes.read_bytes()).decode()]
        code, answer = post(site.url + "v2/models/colours/infer", {"inputs": [{**image, "data": data}]})
        assert 400 <= code < 500, answer
        open_page(browser, site)
        upload(browser, notes)
        error = browser.find_element(By.ID, "error")
        WebDriverWait(browser, WAIT_S).until(lambda _: error.is_displayed())
        assert error.text == answer["error"]
        assert browser.find_elements(By.CSS_SELECTOR, "#results .row") == []
